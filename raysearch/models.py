"""Models stage: the torchvision model factory and the weight sources it loads from.

``create_model(arch, weights=..., dropout=...)`` builds a torchvision backbone *without* letting
torchvision download anything, replaces its classifier with a single abnormality logit
(``nn.Sequential(nn.Dropout(p), nn.Linear(in_features, 1))``) and loads weights from one of:

- ``"none"``: random initialisation;
- ``"imagenet"``: torchvision's DEFAULT weights for the arch, read from the torch hub cache
  (``torch.hub.get_dir()/checkpoints/<file>``) and downloaded there once per node if missing;
- a local file path;
- any fsspec URL (``gs://bucket/w.pth``, ``memory://...``), downloaded once per node into
  ``<cache>/weights/<sha256(url)[:16]>/<basename>`` where ``<cache>`` is ``cache_dir``,
  ``$RAYSEARCH_LOCAL_CACHE`` or ``~/.cache/raysearch``. The cache is keyed by URL, so publish new
  weights under a new name.

Every file is read with ``torch.load(..., weights_only=True)``. Classifier weights that do not fit
the single-logit head are dropped (as timm does when the class count differs); any other mismatch
is a :class:`WeightsError` naming the keys and the file. A trial's own checkpoint is loaded with
:func:`load_checkpoint_weights`, strictly, head included; a mismatch there is a
:class:`CheckpointError` naming the checkpoint, the architecture and the keys. This module never
imports ray.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from urllib.request import Request, urlopen

import torch
import torchvision
from torch import nn

from raysearch.errors import CheckpointError, ConfigError, WeightsError, name_some
from raysearch.storage import atomic_write_bytes, get_fs, is_url, join

__all__ = [
    "ARCHITECTURES",
    "checkpoint_bytes",
    "create_model",
    "fetch_weights",
    "load_checkpoint_weights",
    "load_weights_file",
    "recompute_bn_stats",
    "torchvision_weights_info",
]

logger = logging.getLogger(__name__)

# arch -> the attribute holding the final Linear layer that becomes the single-logit head.
# "classifier[-1]" means the last element of the ``classifier`` Sequential (the rest is kept, so
# the built-in dropout of vgg/efficientnet/mobilenet classifiers stays and `dropout` adds to it).
ARCHITECTURES: dict[str, str] = {
    **{f"densenet{n}": "classifier" for n in (121, 161, 169, 201)},
    **{f"resnet{n}": "fc" for n in (18, 34, 50, 101)},
    **{name: "classifier[-1]" for name in ("vgg16", "vgg16_bn", "vgg19_bn")},
    **{f"efficientnet_b{n}": "classifier[-1]" for n in range(5)},
    "convnext_tiny": "classifier[-1]",
    "mobilenet_v3_small": "classifier[-1]",
    "mobilenet_v3_large": "classifier[-1]",
}

_PROBE_TIMEOUT_S = 15.0  # torch.hub's downloader has no timeout; an offline node must fail fast
_DENSENET_OLD_KEY = re.compile(
    # torchvision/models/densenet.py `_load_state_dict`: the ImageNet files predate the rule that
    # module names may not contain '.', so they say `norm.1` where the model says `norm1`.
    # num_batches_tracked is added for old-style files re-saved by a newer torch.
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


# ----------------------------------------------------------------------------- the factory


def create_model(
    arch: str, *, weights: str = "none", dropout: float = 0.0, cache_dir: str | None = None
) -> nn.Module:
    """Build ``arch`` with a single-logit head and load ``weights`` into it.

    ``weights`` is ``"none"``, ``"imagenet"``, a local path or an fsspec URL (see module doc).
    The model's output is ``[B, 1]`` logits of "abnormal".
    """
    _check_arch(arch)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    # weights=None: torchvision must never download on its own (no timeout, no clear error).
    model = torchvision.models.get_model(arch, weights=None)
    _standard_batchnorm_momentum(model)
    head = _replace_head(model, arch, dropout=dropout)
    if weights != "none":
        path = _local_weights_path(weights, arch=arch, cache_dir=cache_dir)
        _apply_state_dict(model, _read_state_dict(path, arch=arch), head=head, source=path)
    return model


def check_weights(pairs: set[tuple[str, str]]) -> None:
    """Build every (arch, weights) pair once on the driver, before Ray starts.

    A missing file, a file that is not a state dict, a shape mismatch or ImageNet weights that
    cannot be fetched offline then fail at the edge with one clear line, instead of inside every
    trial's workers; a download also lands in this node's cache for the workers here.
    """
    for arch, weights in sorted(pairs):
        if weights != "none":
            create_model(arch, weights=weights)


def checkpoint_bytes(arch: str) -> int:
    """Bytes one trial checkpoint of ``arch`` takes on disk, about: its weights (``model.pt``) and
    Adam's two moment buffers per parameter (``train_state.pt``), float32, i.e.
    ``12 * params + 4 * buffers``. Counted on the meta device: nothing is allocated."""
    _check_arch(arch)
    with torch.device("meta"):
        model = torchvision.models.get_model(arch, weights=None)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    return 12 * params + 4 * buffers


BN_MOMENTUM = 0.1


def _standard_batchnorm_momentum(model: nn.Module) -> None:
    """Give every BatchNorm PyTorch's default momentum (0.1).

    torchvision's MobileNetV3 (and EfficientNet's `norm_layer`s in some versions) use 0.01, tuned
    for long ImageNet runs. Fine-tuned on a new domain for a few hundred steps, their running
    statistics would still be ImageNet's (or random) at the first validations, and eval-mode
    predictions collapse to one class; ASHA would then prune them for the wrong reason.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = BN_MOMENTUM


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BatchNorm's running statistics with their average over ``batches``.

    "Precise BN" (Wu & Johnson, *Rethinking "Batch" in BatchNorm*, 2021; Detectron2's
    ``PreciseBN`` hook). The running averages kept during training mix statistics of weights
    from many steps ago; early in training, or at a high learning rate, they no longer match
    the current weights, and eval-mode predictions are then badly miscalibrated (a from-scratch
    ResNet-18 on the demo data: val_loss 1.5 after its first epoch, 0.6 with precise statistics).
    Validation losses taken that way rank trials by the lag of their statistics, not by what
    they have learnt, which is what ASHA prunes on.

    Only the BatchNorm layers run in train mode, so dropout and stochastic depth stay off. Under
    ``torch.distributed`` every rank passes its own batches and the statistics are averaged
    across ranks. Returns the number of batches seen; with no BatchNorm, or no batches, the
    model is left as it was. The model's train/eval modes are restored.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]
    modes = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in bns]
    n = 0
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # None: a cumulative average over the batches seen
            bn.train()
        for x in batches:
            model(x)
            n += 1
    finally:
        for m, training in modes.items():
            m.train(training)
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
    if n == 0:
        for bn, state in zip(bns, saved):
            bn.load_state_dict(state)
        return 0
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        for bn in bns:
            for buf in (bn.running_mean, bn.running_var):
                dist.all_reduce(buf)
                buf.div_(world)
    return n


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHITECTURES)}")


def _replace_head(model: nn.Module, arch: str, *, dropout: float) -> str:
    """Swap the final Linear for Dropout + Linear(in, 1); return the head's state-dict prefix."""
    where = ARCHITECTURES[arch]
    if where.endswith("[-1]"):
        parent_name = where.removesuffix("[-1]")
        parent: nn.Sequential = getattr(model, parent_name)
        index = len(parent) - 1
        old = parent[index]
        parent[index] = _single_logit_head(old, dropout)
        return f"{parent_name}.{index}"
    old = getattr(model, where)
    setattr(model, where, _single_logit_head(old, dropout))
    return where


def _single_logit_head(old: nn.Module, dropout: float) -> nn.Sequential:
    assert isinstance(old, nn.Linear), f"expected a Linear classifier, found {type(old).__name__}"
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(old.in_features, 1))


# ----------------------------------------------------------------------------- reading files


def load_weights_file(
    source: str, *, arch: str, cache_dir: str | None = None
) -> dict[str, torch.Tensor]:
    """Resolve ``source`` ("imagenet", a path or a URL) to a local file and read its state dict.

    Wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and ``module.`` prefixes are removed,
    and DenseNet's old key names are remapped, so the result matches torchvision's key names.
    """
    _check_arch(arch)
    if source == "none":
        raise ConfigError("weights 'none' has no file to load")
    path = _local_weights_path(source, arch=arch, cache_dir=cache_dir)
    return _read_state_dict(path, arch=arch)


def _read_state_dict(path: str, *, arch: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickled modules, garbage bytes, truncated zips all land here
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise WeightsError(
            f"weights file {path} is not a state dict readable with weights_only=True "
            f"({type(e).__name__}: {first[:200]})"
        ) from None
    state = _unwrap(obj, path)
    if arch.startswith("densenet"):
        state = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    return state


def _unwrap(obj: object, path: str) -> dict[str, torch.Tensor]:
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not obj:
        kind = "an empty mapping" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise WeightsError(f"weights file {path} holds {kind}, not a state dict")
    not_tensors = [k for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if not_tensors:
        raise WeightsError(
            f"weights file {path} is not a state dict: entries {name_some(not_tensors)} "
            "are not named tensors"
        )
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):  # DDP / DataParallel and torch.compile wrappers
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _apply_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], *, head: str, source: str
) -> None:
    own = model.state_dict()

    def in_head(key: str) -> bool:
        return key.startswith(head + ".")

    # An ImageNet head (1000 classes) cannot fill a single-logit head: drop it, as expected.
    dropped = [
        k for k, v in state.items() if in_head(k) and (k not in own or own[k].shape != v.shape)
    ]
    if dropped:
        logger.debug("weights %s: dropped classifier keys %s", source, ", ".join(dropped))
    state = {k: v for k, v in state.items() if k not in set(dropped)}

    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise WeightsError(
            f"weights file {source} does not fit the model: unexpected keys {name_some(unexpected)}"
        )
    mismatched = [
        f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
        for k, v in state.items()
        if v.shape != own[k].shape
    ]
    if mismatched:
        raise WeightsError(
            f"weights file {source} does not fit the model: shape mismatch in {name_some(mismatched)}"
        )
    # strict=False only so that a missing head is allowed; BatchNorm fills a missing
    # num_batches_tracked itself, so it never shows up as missing here.
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not in_head(k)]
    if missing:
        raise WeightsError(
            f"weights file {source} does not fit the model: missing keys {name_some(missing)}"
        )


def load_checkpoint_weights(
    model: nn.Module, state: object, *, arch: str, source: str
) -> None:
    """Load a trained checkpoint's full state dict into ``model`` (``create_model(arch)``), strictly.

    Unlike pretrained weights, a trial's own checkpoint must fit exactly, its single-logit head
    included: nothing is dropped or remapped. ``state`` is what ``torch.load`` returned, ``source``
    names it in errors (e.g. ``"trial t1: model.pt in gs://b/exp/train-t1/checkpoint_000002"``).
    Raises CheckpointError ``"<source>: the weights do not fit resnet18: missing keys a, b, c
    (+N more); unexpected keys ...; shape mismatch in k (2, 512) != (1, 512)"`` on any mismatch,
    or when ``state`` is not a mapping of names to tensors.
    """
    if not isinstance(state, Mapping) or not state:
        kind = "an empty mapping" if isinstance(state, Mapping) else f"a {type(state).__name__}"
        raise CheckpointError(f"{source}: holds {kind}, not a state dict")
    not_tensors = [k for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if not_tensors:
        raise CheckpointError(
            f"{source}: not a state dict: entries {name_some(not_tensors)} are not named tensors"
        )
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = [
        f"{what} {name_some(keys)}"
        for what, keys in (
            ("missing keys", missing), ("unexpected keys", unexpected),
            ("shape mismatch in", mismatched),
        )
        if keys
    ]  # fmt: skip
    if problems:
        raise CheckpointError(f"{source}: the weights do not fit {arch}: {'; '.join(problems)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # e.g. a dtype torch cannot copy; keys and shapes matched above
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{source}: the weights do not fit {arch}: {first}") from None


# ----------------------------------------------------------------------------- weight sources


def torchvision_weights_info(arch: str) -> tuple[str, str]:
    """(download URL, file name) of torchvision's DEFAULT ImageNet weights for ``arch``."""
    _check_arch(arch)
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    return url, url.rsplit("/", 1)[-1]


def fetch_weights(arch: str, *, to: str) -> str:
    """Stage torchvision's ImageNet file for ``arch`` at ``to``; return the file's full URI.

    ``to`` is a folder or bucket prefix (the torchvision file name is appended) or a full file URI
    ending in ``.pth``/``.pt``. The hub cache copy is used when present, else it is downloaded.
    Run this where there is internet, then train elsewhere with ``weights: <returned URI>``.
    """
    local = _imagenet_path(arch)
    _, filename = torchvision_weights_info(arch)
    target = to if to.endswith((".pth", ".pt")) else join(to, filename)
    atomic_write_bytes(target, Path(local).read_bytes())
    return target


def _local_weights_path(source: str, *, arch: str, cache_dir: str | None) -> str:
    if source == "imagenet":
        return _imagenet_path(arch)
    if is_url(source):
        return _cached_url(source, cache_dir=cache_dir)
    path = os.path.abspath(os.path.expanduser(source.removeprefix("file://")))
    if not os.path.isfile(path):
        raise WeightsError(
            f"weights file not found: {source} (weights must be 'none', 'imagenet', "
            "a file path or a URL)"
        )
    return path


def _imagenet_path(arch: str) -> str:
    url, filename = torchvision_weights_info(arch)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if os.path.isfile(path):
        return path
    with _node_lock(path):
        if os.path.isfile(path):  # another worker on this node finished the download
            return path
        try:
            _download_url(url, path)
        except (OSError, RuntimeError, http.client.HTTPException) as e:
            raise WeightsError(
                f"no ImageNet weights for {arch}: {path} is missing and downloading {url} failed "
                f"({type(e).__name__}: {e}); copy {filename} there, or run `raysearch weights fetch "
                f"{arch} --to gs://BUCKET/weights` on a machine with internet and set "
                f"`weights: gs://BUCKET/weights/{filename}`"
            ) from None
    return path


def _download_url(url: str, dst: str) -> None:
    """Download ``url`` to ``dst`` (atomically), checking torchvision's hash in the file name."""
    # A HEAD request with a timeout first: torch.hub.download_url_to_file would block forever on
    # a node whose packets are silently dropped.
    probe = Request(url, method="HEAD", headers={"User-Agent": "raysearch"})
    with urlopen(probe, timeout=_PROBE_TIMEOUT_S):
        pass
    match = torch.hub.HASH_REGEX.search(os.path.basename(dst))
    torch.hub.download_url_to_file(
        url, dst, hash_prefix=match.group(1) if match else None, progress=False
    )


def _cached_url(url: str, *, cache_dir: str | None) -> str:
    root = cache_dir or os.environ.get("RAYSEARCH_LOCAL_CACHE") or "~/.cache/raysearch"
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    basename = url.rstrip("/").rsplit("/", 1)[-1] or "weights.pth"
    path = os.path.join(os.path.expanduser(root), "weights", digest, basename)
    if os.path.isfile(path):
        return path
    with _node_lock(path):
        if os.path.isfile(path):
            return path
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            fs, remote = get_fs(url)  # inside the try: an unknown protocol is a user error too
            with fs.open(remote, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
            os.replace(tmp, path)
        except FileNotFoundError:
            raise WeightsError(f"weights file not found: {url}") from None
        except Exception as e:  # noqa: BLE001 - auth, network, bucket errors: one line, naming the URL
            raise WeightsError(
                f"could not download weights {url}: {type(e).__name__}: {e}"
            ) from None
        finally:
            Path(tmp).unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def _node_lock(path: str) -> Iterator[None]:
    """Hold an exclusive file lock next to ``path`` so one process per node downloads it."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(f"{path}.lock", "a")  # noqa: SIM115 - closed by the `with` below
    except OSError as e:
        raise WeightsError(
            f"cannot write the weights cache {folder} ({type(e).__name__}: {e}); point "
            "TORCH_HOME (imagenet) or RAYSEARCH_LOCAL_CACHE (URLs) at a writable folder"
        ) from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
