"""Models stage, the factory: build a registered architecture with raysearch's head, and load
its starting weights (see :mod:`raysearch.models.weights`).

``create_model(arch, weights=..., dropout=...)`` builds a torchvision backbone *without* letting
torchvision download anything, replaces its classifier with ``nn.Sequential(nn.Dropout(p),
nn.Linear(in_features, K))`` (K logits, one per label of the task) and loads ``weights`` into it.
With ``binary_relevance`` it builds K such models of one logit each instead, one per label
(:class:`PerLabelModels`), as source report 3 trained CheXpert. Never imports ray.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torchvision
from torch import nn

from raysearch.errors import ConfigError
from raysearch.models.registry import ARCHITECTURES, check_arch
from raysearch.models.weights import apply_pretrained, read_state_dict, resolve_weights_file

__all__ = ["PerLabelModels", "check_weights", "checkpoint_bytes", "create_model",
           "recompute_bn_stats"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the factory


class PerLabelModels(nn.Module):
    """Binary relevance (Tsoumakas and Katakis 2007; source report 3's one model per CheXpert
    label): K independent single-logit models as one module, ``[B, 3, H, W]`` images to
    ``[B, K]`` logits, column k from model k.

    Trained with the masked per-label BCE, label k's loss reaches the parameters of model k
    only, and Adam keeps its moments per parameter, so one optimiser trains K separate models
    (their learning-rate schedule and early stopping follow the mean val loss, as the joint
    model's do). State-dict keys: ``per_label.<k>.<the single model's key>``.
    """

    def __init__(self, models: Iterable[nn.Module]):
        super().__init__()
        self.per_label = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.per_label], dim=1)


def create_model(
    arch: str,
    *,
    weights: str = "none",
    dropout: float = 0.0,
    num_labels: int = 1,
    cache_dir: str | None = None,
    binary_relevance: bool = False,
) -> nn.Module:
    """Build ``arch`` with a head of ``num_labels`` logits and load ``weights`` into it.

    ``weights`` is ``"none"``, ``"imagenet"``, a local path or an fsspec URL (see
    :mod:`raysearch.models.weights`). The model maps ``[B, 3, H, W]`` float images to ``[B, K]``
    logits, K = ``num_labels`` (one per label of the task; MURA: 1, "abnormal"). With
    ``binary_relevance`` and K > 1 it is :class:`PerLabelModels` of K single-logit models,
    each from ``weights`` (K = 1: the one model either way). Raises :class:`ConfigError` for an
    unknown architecture or a bad dropout or label count, and
    :class:`~raysearch.errors.WeightsError` for weights that are missing or do not fit.
    """
    check_arch(arch)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    if not 1 <= num_labels <= 1000:
        raise ConfigError(f"num_labels must be in [1, 1000], got {num_labels!r}")
    if binary_relevance and num_labels > 1:
        return PerLabelModels(
            create_model(arch, weights=weights, dropout=dropout, num_labels=1,
                         cache_dir=cache_dir)
            for _ in range(num_labels)
        )
    # weights=None: torchvision must never download on its own (no timeout, no clear error).
    model = torchvision.models.get_model(arch, weights=None)
    _standard_batchnorm_momentum(model)
    head = _replace_head(model, arch, dropout=dropout, num_labels=num_labels)
    if weights != "none":
        path = resolve_weights_file(weights, arch=arch, cache_dir=cache_dir)
        apply_pretrained(model, read_state_dict(path, arch=arch), head=head, source=path)
    return model


def check_weights(pairs: set[tuple[str, str]]) -> None:
    """Build every (arch, weights) pair once on the driver, before Ray starts.

    A missing file, a file that is not a state dict, a shape mismatch or ImageNet weights that
    cannot be fetched offline then fail at the edge with one clear line, instead of inside every
    trial's workers; a download also lands in this node's cache for the workers here.
    """
    from raysearch.errors import WeightsError

    for arch, weights in sorted(pairs):
        if weights != "none":
            try:
                create_model(arch, weights=weights)
            except WeightsError as e:
                if len({a for a, _ in pairs}) > 1 and not str(e).startswith(arch):
                    raise WeightsError(f"{arch}: {e}") from None  # which of the searched archs
                raise


def checkpoint_bytes(arch: str) -> int:
    """Bytes one trial checkpoint of ``arch`` takes on disk, about: its weights (``model.pt``) and
    Adam's two moment buffers per parameter (``train_state.pt``), float32, i.e.
    ``12 * params + 4 * buffers``. Counted on the meta device: nothing is allocated."""
    check_arch(arch)
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
    across ranks. BatchNorm layers whose parameters are frozen (``finetune``) are left alone.
    Returns the number of batches seen; with no trainable BatchNorm, or no batches, the model is
    left as it was. The model's train/eval modes are restored.
    """
    # A frozen BatchNorm (finetune: head, or outside last_n_blocks) keeps its statistics.
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and any(p.requires_grad for p in m.parameters(recurse=False))]
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


def _replace_head(model: nn.Module, arch: str, *, dropout: float, num_labels: int) -> str:
    """Swap the final Linear for Dropout + Linear(in, K); return the head's state-dict prefix."""
    where = ARCHITECTURES[arch]
    if where.endswith("[-1]"):
        parent_name = where.removesuffix("[-1]")
        parent: nn.Sequential = getattr(model, parent_name)
        index = len(parent) - 1
        old = parent[index]
        parent[index] = _head(old, dropout, num_labels)
        return f"{parent_name}.{index}"
    old = getattr(model, where)
    setattr(model, where, _head(old, dropout, num_labels))
    return where


def _head(old: nn.Module, dropout: float, num_labels: int) -> nn.Sequential:
    assert isinstance(old, nn.Linear), f"expected a Linear classifier, found {type(old).__name__}"
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(old.in_features, num_labels))


# ----------------------------------------------------------------------------- reading files


# ----------------------------------------------------------------------------- weight sources


