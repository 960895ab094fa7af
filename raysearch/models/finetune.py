"""Models stage, transfer-learning modes: which parameters of a pretrained model train, at which
learning rate, and when. Never imports ray.

``finetune`` (a trial-config key, searchable like any other):

* ``full``: every parameter trains (the MURA paper's recipe, raysearch's default);
* ``head``: the ImageNet backbone is frozen, its BatchNorm layers stay in eval mode (their running
  statistics never move), and only the new head trains. The "frozen convolutional base" of
  transfer learning (Yosinski et al., *How transferable are features in deep neural networks?*,
  NeurIPS 2014; source report 1 compares it with fine-tuning on MURA with VGG16);
* ``gradual``: the head alone for ``warmup_epochs`` epochs, then the backbone too at
  ``lr * backbone_lr_mult`` (ULMFiT's gradual unfreezing and discriminative learning rates,
  Howard & Ruder 2018, arXiv:1801.06146).

``last_n_blocks`` (with ``full`` or ``gradual``) restricts the backbone part that ever trains to
its last N blocks (the registry's :data:`~raysearch.models.registry.BLOCKS`); the stem and
earlier blocks stay frozen like a ``head`` trial's backbone.

Frozen parameters have ``requires_grad = False``: autograd computes no gradient for them (and no
backward pass below the first trainable layer), and the optimiser keeps no state for them, so a
``head`` trial is cheaper per image, not just slower to learn (``raysearch bench train``).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from raysearch.models.registry import ARCHITECTURES, BLOCKS, check_arch

__all__ = [
    "backbone_blocks",
    "backbone_trains",
    "freeze_batchnorm",
    "head_module",
    "optimizer_groups",
    "set_trainable",
]


def head_module(model: nn.Module, arch: str) -> nn.Module:
    """raysearch's head of ``model`` (the ``Sequential(Dropout, Linear(in, K))`` that
    :func:`~raysearch.models.factory.create_model` put in place of the ImageNet classifier)."""
    where = ARCHITECTURES[arch]
    if where.endswith("[-1]"):
        return getattr(model, where.removesuffix("[-1]"))[-1]
    return getattr(model, where)


def backbone_blocks(model: nn.Module, arch: str) -> list[list[nn.Module]]:
    """The backbone's blocks of ``model``, input to output, each a list of modules.

    The stem before the first block is not a block. How many there are per architecture is
    :data:`raysearch.models.registry.BLOCKS` (see there for what each block holds). Raises
    :class:`~raysearch.errors.ConfigError` for an unknown architecture.
    """
    check_arch(arch)
    if arch.startswith("densenet"):
        f = model.features
        return [[f.denseblock1, f.transition1], [f.denseblock2, f.transition2],
                [f.denseblock3, f.transition3], [f.denseblock4, f.norm5]]
    if arch.startswith("resnet"):
        return [[model.layer1], [model.layer2], [model.layer3], [model.layer4]]
    if arch.startswith("vgg"):
        stages, current = [], []
        for layer in model.features:
            current.append(layer)
            if isinstance(layer, nn.MaxPool2d):
                stages.append(current)
                current = []
        if current:
            stages[-1].extend(current)
        return [*stages, list(model.classifier)[:-1]]  # fc6 + fc7, their ReLUs and dropouts
    if arch.startswith("efficientnet"):
        return [[block] for block in list(model.features)[1:]]
    if arch.startswith("convnext"):
        blocks = [[block] for block in list(model.features)[1:]]
        blocks[-1].extend(list(model.classifier)[:-1])  # the final LayerNorm2d (and Flatten)
        return blocks
    if arch.startswith("mobilenet_v3"):
        return [*([block] for block in list(model.features)[1:]), list(model.classifier)[:-1]]
    raise AssertionError(f"no block rule for {arch}")  # every registered arch has one above


def _params(modules: list[nn.Module]) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p


def _trainable_backbone(model: nn.Module, arch: str, last_n_blocks: int | None) -> list[nn.Parameter]:
    """The backbone parameters a ``full`` or ``gradual`` trial ever trains: all of them, or those
    of the last ``last_n_blocks`` blocks."""
    head = {id(p) for p in head_module(model, arch).parameters()}
    if last_n_blocks is None:
        return [p for p in model.parameters() if id(p) not in head]
    blocks = backbone_blocks(model, arch)
    assert len(blocks) == BLOCKS[arch], f"{arch}: {len(blocks)} blocks, registry says {BLOCKS[arch]}"
    chosen = [m for block in blocks[len(blocks) - last_n_blocks:] for m in block]
    return [p for p in _params(chosen) if id(p) not in head]


def backbone_trains(mode: str, epoch: int, warmup_epochs: int) -> bool:
    """Whether the backbone trains in ``epoch`` (1-based) of a ``mode`` trial: always for
    ``full``, never for ``head``, after the first ``warmup_epochs`` epochs for ``gradual``."""
    if mode == "full":
        return True
    if mode == "head":
        return False
    return epoch > warmup_epochs


def set_trainable(model: nn.Module, arch: str, *, backbone: bool,
                  last_n_blocks: int | None = None) -> int:
    """Set ``requires_grad``: the head always trains; the backbone (or its last
    ``last_n_blocks`` blocks) trains when ``backbone`` is true; everything else is frozen.
    Returns the number of trainable parameter elements."""
    trainable = {id(p) for p in head_module(model, arch).parameters()}
    if backbone:
        trainable |= {id(p) for p in _trainable_backbone(model, arch, last_n_blocks)}
    n = 0
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
        n += p.numel() if id(p) in trainable else 0
    return n


def optimizer_groups(model: nn.Module, arch: str, *, mode: str, lr: float,
                     backbone_lr_mult: float, last_n_blocks: int | None = None) -> list[dict]:
    """Parameter groups for the optimiser: ``{"params", "lr", "name"}`` for the head at ``lr``,
    and (unless ``mode`` is ``head``) the backbone parameters the trial ever trains at
    ``lr * backbone_lr_mult`` (discriminative learning rates, ULMFiT). A ``head`` trial's
    optimiser never sees the backbone, and a ``gradual`` trial's keeps no state for it until it
    first has a gradient (Adam and AdamW skip parameters whose ``grad`` is None)."""
    groups = [{"params": list(head_module(model, arch).parameters()), "lr": lr, "name": "head"}]
    if mode != "head":
        backbone = _trainable_backbone(model, arch, last_n_blocks)
        if backbone:
            groups.append({"params": backbone, "lr": lr * backbone_lr_mult, "name": "backbone"})
    return groups


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm whose parameters are all frozen into eval mode (call it after
    ``model.train()``): a frozen layer then normalises with its pretrained running statistics,
    and they do not move. Returns how many layers were set to eval."""
    n = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
                n += 1
    return n
