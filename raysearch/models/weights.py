"""Models stage, weights: where pretrained weights come from, and how weight files are read.

Sources (``weights:`` in a trial config):

- ``"none"``: random initialisation;
- ``"imagenet"``: torchvision's DEFAULT weights for the arch, read from the torch hub cache
  (``torch.hub.get_dir()/checkpoints/<file>``) and downloaded there once per node if missing;
- a local file path;
- any fsspec URL (``gs://bucket/w.pth``, ``memory://...``), downloaded once per node into
  ``<cache>/weights/<sha256(url)[:16]>/<basename>`` where ``<cache>`` is ``cache_dir``,
  ``$RAYSEARCH_LOCAL_CACHE`` or ``~/.cache/raysearch``. The cache is keyed by URL, so publish new
  weights under a new name.

Every file is read with ``torch.load(..., weights_only=True)``. Classifier weights that do not fit
the new head are dropped (as timm does when the class count differs); any other mismatch is a
:class:`WeightsError` naming the keys and the file. A trained checkpoint must fit exactly
(:func:`load_checkpoint_weights`). Never imports ray.
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
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.request import Request, urlopen

import torch
import torchvision
from torch import nn

from raysearch.errors import CheckpointError, ConfigError, WeightsError, first_line, name_some
from raysearch.models.registry import check_arch, check_weights_file
from raysearch.storage import atomic_write_bytes, get_fs, is_url, join

__all__ = [
    "fetch_weights",
    "find_state_dict",
    "load_checkpoint_weights",
    "load_weights_file",
    "strip_wrapper_prefixes",
    "torchvision_weights_info",
]

logger = logging.getLogger(__name__)


_PROBE_TIMEOUT_S = 15.0  # torch.hub's downloader has no timeout; an offline node must fail fast

_DENSENET_OLD_KEY = re.compile(
    # torchvision/models/densenet.py `_load_state_dict`: the ImageNet files predate the rule that
    # module names may not contain '.', so they say `norm.1` where the model says `norm1`.
    # num_batches_tracked is added for old-style files re-saved by a newer torch.
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)

def load_weights_file(
    source: str, *, arch: str, cache_dir: str | None = None
) -> dict[str, torch.Tensor]:
    """Resolve ``source`` ("imagenet", a path or a URL) to a local file and read its state dict.

    Checkpoint wrappers (``{"epoch": ..., "model_state_dict": ...}``, ``{"state_dict": ...}``,
    ``{"model": ...}``: :data:`STATE_DICT_KEYS`) and wrapper prefixes (``module.``,
    ``_orig_mod.``, any order and nesting) are removed, and DenseNet's old key names are
    remapped, so the result matches torchvision's key names. Raises :class:`WeightsError` naming
    the file, and the keys it holds when none of them holds a state dict.
    """
    check_arch(arch)
    if source == "none":
        raise ConfigError("weights 'none' has no file to load")
    path = resolve_weights_file(source, arch=arch, cache_dir=cache_dir)
    return read_state_dict(path, arch=arch)

def read_state_dict(path: str, *, arch: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickled modules, garbage bytes, truncated zips all land here
        raise WeightsError(
            f"weights file {path} is not a state dict readable with weights_only=True "
            f"({type(e).__name__}: {first_line(e)[:200]})"
        ) from None
    state = _unwrap(obj, path)
    if arch.startswith("densenet"):
        state = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    return state

# Keys under which checkpoints commonly keep the model's state dict: PyTorch's "saving a general
# checkpoint" tutorial (model_state_dict), Lightning and timm (state_dict), torchvision's
# references and DeiT (model), DeepSpeed's model_states files (module), and others (net,
# network, model_state, state, weights, params).
STATE_DICT_KEYS = (
    "state_dict", "model_state_dict", "model", "model_state", "module", "net", "network", "state",
    "weights", "params",
)  # fmt: skip
# Prefixes that wrappers add to every key: DistributedDataParallel / DataParallel (module.) and
# torch.compile (_orig_mod.), nested in any order (a compiled DDP model saves _orig_mod.module.).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every leading wrapper prefix (``module.``, ``_orig_mod.``, any order and
    nesting, e.g. ``_orig_mod.module.module.layer1.0.conv1.weight``) removed from each key."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())
    )


def _find_state_dict(obj: object, depth: int = 0) -> Mapping | None:
    if _is_state_dict(obj):
        return obj
    if not isinstance(obj, Mapping) or depth >= 3:
        return None
    for key in STATE_DICT_KEYS:
        found = _find_state_dict(obj.get(key), depth + 1)
        if found is not None:
            return found
    return None


def find_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """The state dict inside what ``torch.load`` returned, with wrapper prefixes stripped.

    ``obj`` may be the state dict itself or a checkpoint holding it under one of
    :data:`STATE_DICT_KEYS` (``{"epoch": 3, "model_state_dict": {...}, "optimizer_state_dict":
    ...}``), nested up to three levels. Raises ``ValueError`` with a phrase that says what ``obj``
    holds instead ("not a state dict: it holds a dict with keys epoch, loss, optimizer and no state dict under any of
    state_dict, model_state_dict, ..."), for the caller to prefix with the file's name.
    """
    found = _find_state_dict(obj)
    if found is not None:
        return strip_wrapper_prefixes(found)
    if not isinstance(obj, Mapping):
        raise ValueError(f"holds a {type(obj).__name__}, not a state dict")  # noqa: TRY004 - a message, not a type check for the caller
    if not obj:
        raise ValueError("holds an empty mapping, not a state dict")
    if any(torch.is_tensor(v) for v in obj.values()):  # a state dict with stray entries
        bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
        raise ValueError(f"not a state dict: entries {name_some(bad)} are not named tensors")
    raise ValueError(
        f"not a state dict: it holds a dict with keys {name_some([str(k) for k in obj])} and "
        f"no state dict under any of {', '.join(STATE_DICT_KEYS)}"
    )


def _unwrap(obj: object, path: str) -> dict[str, torch.Tensor]:
    try:
        return find_state_dict(obj)
    except ValueError as e:
        raise WeightsError(f"weights file {path}: {e}") from None


def apply_pretrained(
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
    included: nothing is dropped or remapped. As for any weights file, a general-checkpoint
    wrapper and wrapper prefixes are removed first (:func:`find_state_dict`). ``state`` is what ``torch.load`` returned, ``source``
    names it in errors (e.g. ``"trial t1: model.pt in gs://b/exp/train-t1/checkpoint_000002"``).
    Raises CheckpointError ``"<source>: the weights do not fit resnet18: missing keys a, b, c
    (+N more); unexpected keys ...; shape mismatch in k (2, 512) != (1, 512)"`` on any mismatch,
    or when ``state`` holds no mapping of names to tensors (naming the keys it holds).
    """
    try:
        state = find_state_dict(state)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
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
        raise CheckpointError(f"{source}: the weights do not fit {arch}: {first_line(e)}") from None

def torchvision_weights_info(arch: str) -> tuple[str, str]:
    """(download URL, file name) of torchvision's DEFAULT ImageNet weights for ``arch``."""
    check_arch(arch)
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

def resolve_weights_file(source: str, *, arch: str, cache_dir: str | None) -> str:
    if source == "imagenet":
        return _imagenet_path(arch)
    if is_url(source):
        return _cached_url(source, cache_dir=cache_dir)
    return check_weights_file(source, arch=arch)

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
