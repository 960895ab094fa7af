"""Explain stage, one member's maps: Grad-CAM, HiResCAM, Grad-CAM++ (the ``grad-cam`` library)
and CAM (from the classifier weights), *unnormalised*, for an explicitly named class.

Methods and sources:

- ``gradcam``: Selvaraju et al., ICCV 2017, "Grad-CAM": ReLU(sum_c alpha_c A_c), alpha_c the
  spatial mean of d score / d A_c.
- ``hirescam``: Draelos & Carin, 2020, "Use HiResCAM instead of Grad-CAM": ReLU(sum_c
  d score / d A_c * A_c), element-wise; exact for a head of global average pooling + linear.
- ``gradcam++``: Chattopadhay et al., WACV 2018, "Grad-CAM++" (eq. 19 of arXiv:1710.11063).
- ``cam``: Zhou et al., CVPR 2016, "Learning Deep Features for Discriminative Localization":
  ReLU(sum_c w_c A_c), w the head's weights for the class; only where the layer feeds global
  average pooling and then the linear head (:data:`raysearch.models.registry.CAM_HEADS`).

Why not the library's ``cam(input_tensor)`` call: it min-max scales every map to [0, 1] on its
own (``scale_cam_image``), after which maps of different members, or of different images, can no
longer be compared or averaged, and an ensemble map needs both. So the library's hooks
(``ActivationsAndGradients``) collect the activations and gradients and its ``get_cam_image``
combines them, exactly as in the library, but the result is taken before the scaling. The
library's default target (``targets=None``: the arg-max logit) always explains "abnormal" with a
one-logit head, so the score is built here from an explicit :class:`Target`.

Never imports ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysearch.data.dataset import Task
from raysearch.errors import ConfigError
from raysearch.models.registry import ARCHITECTURES, CAM_HEADS, cam_layer

__all__ = ["METHODS", "ExplainedNet", "MemberMaps", "Target", "member_maps", "resolve_target"]

METHODS = ("gradcam", "hirescam", "gradcam++", "cam")


@dataclass(frozen=True)
class Target:
    """The explained class: the score is ``sign * logits[:, index]``.

    ``label`` is what tables show: a task label, or ``"normal"`` for the negated logit of a
    one-label task (the evidence *against* the finding; explaining the sigmoid instead would
    saturate, so the logit is explained, as the grad-cam docs advise)."""

    label: str
    index: int
    sign: float


def resolve_target(task: Task, label: str | None) -> Target:
    """The :class:`Target` for ``label`` (default: the task's first label, "abnormal" for MURA).

    Raises :class:`ConfigError` for a label the task does not have, and for ``"normal"`` on a
    task of several labels, where "not this label" is no class of its own."""
    if label is None:
        label = task.labels[0]
    if label in task.labels:
        return Target(label=label, index=task.labels.index(label), sign=1.0)
    if label == "normal":
        if task.k == 1:
            return Target(label="normal", index=0, sign=-1.0)
        raise ConfigError(f"--label normal is meaningless for task {task.name!r}, which has "
                          f"{task.k} independent labels ({', '.join(task.labels)}): explain one "
                          "of them")
    allowed = [*task.labels, *(["normal"] if task.k == 1 else [])]
    raise ConfigError(f"unknown --label {label!r} for task {task.name!r}; allowed: "
                      f"{', '.join(allowed)}")


class ExplainedNet(nn.Module):
    """A member's network as explanations run it: the same parameters (shared, not copied), the
    same logits ``[B, K]`` for ``[B, 3, S, S]`` inputs.

    For DenseNet the forward pass is torchvision's, written out with its final ReLU as an
    out-of-place module ``relu5``: torchvision applies ``F.relu(..., inplace=True)`` after
    ``norm5``, which overwrites a hooked ``norm5`` output on the CPU but not on a GPU (see
    :data:`raysearch.models.registry.CAM_LAYERS`)."""

    def __init__(self, net: nn.Module, arch: str) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ConfigError(f"unknown arch {arch!r}")
        self.net = net
        self.arch = arch
        self.densenet = arch.startswith("densenet")
        if self.densenet:
            self.relu5 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.densenet:
            return self.net(x)
        # torchvision.models.DenseNet.forward, with the ReLU out of place.
        out = self.relu5(self.net.features(x))
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.net.classifier(out)

    def layer(self, name: str | None = None) -> nn.Module:
        """The module named ``name`` (a path in the torchvision model, e.g. ``layer3`` or
        ``features.denseblock3``), default the architecture's registered layer. Raises
        :class:`ConfigError` for a name the model does not have, listing its top-level modules."""
        name = name or cam_layer(self.arch)
        if name == "relu5" and self.densenet:
            return self.relu5
        try:
            return self.net.get_submodule(name)
        except AttributeError:
            tops = [n for n, _ in self.net.named_children()]
            raise ConfigError(f"{self.arch} has no layer {name!r}; its top-level layers: "
                              f"{', '.join(tops)} (nest with dots, e.g. {tops[0]}.0)") from None

    def head(self) -> nn.Linear:
        """The final linear layer (the K-logit head)."""
        where = ARCHITECTURES[self.arch]
        module = self.net.get_submodule(where.removesuffix("[-1]"))
        if where.endswith("[-1]"):
            module = module[-1]
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        return linears[-1]


@dataclass
class MemberMaps:
    """One member's maps for a batch: ``maps`` float32 ``[B, h, w]`` >= 0, unnormalised, at the
    layer's resolution; ``logits`` float32 ``[B, K]`` of the same forward pass."""

    maps: np.ndarray
    logits: np.ndarray


def _protect(module, inputs, output):
    # Registered *after* the library's hooks: the library keeps ``output`` (``.cpu()`` is a view
    # on the CPU) and the model continues with this copy, so an in-place op downstream (a ReLU,
    # as in DenseNet's blocks) cannot overwrite what was kept, on any device.
    return output.clone()


def member_maps(
    net: ExplainedNet,
    x: torch.Tensor,
    *,
    method: str,
    target: Target,
    layer: str | None = None,
) -> MemberMaps:
    """Unnormalised maps of ``method`` for the normalised inputs ``x`` ``[B, 3, S, S]`` (float32,
    on the model's device), explaining ``target`` at ``layer`` (default: the registered one).

    Runs in float32 without autocast. Only the input's gradient is asked for, so no parameter
    gradient is computed or left behind. Every hook is removed before returning, also on error.
    Raises :class:`ConfigError` for an unknown method, and for ``cam`` where the architecture's
    head is not global average pooling + linear or another layer is asked for.
    """
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM

    if method not in METHODS:
        raise ConfigError(f"unknown --method {method!r}; allowed: {', '.join(METHODS)}")
    if method == "cam" and (net.arch not in CAM_HEADS or (layer and layer != cam_layer(net.arch))):
        why = "has none" if net.arch not in CAM_HEADS else f"not --layer {layer}"
        raise ConfigError(f"--method cam needs the layer that feeds global average pooling and "
                          f"the linear head ({net.arch}: {why}); use gradcam or hirescam")
    module = net.layer(layer)
    cls = {"gradcam": GradCAM, "hirescam": HiResCAM, "gradcam++": GradCAMPlusPlus,
           "cam": GradCAM}[method]
    cam = cls(model=net, target_layers=[module])
    guard = module.register_forward_hook(_protect)
    hooks = cam.activations_and_grads
    try:
        with torch.set_grad_enabled(method != "cam"):
            x = x.detach().float().requires_grad_(method != "cam")
            logits = hooks(x).float()
            score = target.sign * logits[:, target.index]
            if method != "cam":
                # Gradients reach the layer's output hook without any parameter's .grad.
                torch.autograd.grad(score.sum(), x)
        acts = hooks.activations[0].float().numpy()  # [B, C, h, w]
        if method == "cam":
            w = target.sign * net.head().weight[target.index].detach().float().cpu().numpy()
            raw = np.einsum("c,bchw->bhw", w, acts)
        else:
            grads = hooks.gradients[0].float().numpy()
            raw = cam.get_cam_image(x, module, None, acts, grads, False)
        out = MemberMaps(maps=np.maximum(raw, 0).astype(np.float32),
                         logits=logits.detach().cpu().numpy().astype(np.float32))
    finally:
        # Not ``with cam:``: grad-cam's __exit__ swallows IndexError. release() removes its hooks.
        guard.remove()
        hooks.release()
    return out
