"""Data stage, augmentation: batched, on-device augmentation and normalisation.

The decode-once cache hands the trainer uint8 ``[B, 1, H, W]`` batches. :class:`DeviceAugment`
turns one into the float32 ``[B, 3, H, W]`` ImageNet-normalised input the backbone expects, on
the training device and with tensor ops only, because per-image PIL transforms on the CPU were
the bottleneck that starved the accelerator (source report 3). Geometry is ONE
``affine_grid`` + ``grid_sample`` per batch (rotation, flip, zoom and shift folded into one
matrix per sample); brightness/contrast are per-sample scalars. All randomness comes from one
``torch.Generator`` seeded by the caller, and its state travels in the checkpoint for exact resume.
This module never imports ray.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from raysearch.data.augment_params import PRESETS, AugmentParams, resolve_augment

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "AugmentParams",
    "DeviceAugment",
    "affine_theta",
    "resolve_augment",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def affine_theta(
    *,
    angle: torch.Tensor,
    hflip: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """The ``[B, 2, 3]`` sampling matrices for ``F.affine_grid`` (output -> input coordinates).

    Content is flipped (``hflip`` bool), rotated counter-clockwise on screen by ``angle`` degrees,
    zoomed by ``scale`` and moved by ``shift`` ``[B, 2]`` (x right, y down; fractions of the size).
    """
    a = torch.deg2rad(angle)
    cos, sin = torch.cos(a), torch.sin(a)
    flip = 1.0 - 2.0 * hflip.to(cos.dtype)
    # Inverse map in pixel units (y down): p_in = Flip @ Rot(angle)^-1 @ p_out / scale.
    m00, m01 = flip * cos / scale, -flip * sin / scale
    m10, m11 = sin / scale, cos / scale
    # affine_grid works in [-1, 1] per axis; conjugating by diag(W/2, H/2) keeps angles true
    # on non-square images.
    m01, m10 = m01 * (height / width), m10 * (width / height)
    tx, ty = 2.0 * shift[:, 0], 2.0 * shift[:, 1]
    row0 = torch.stack([m00, m01, -(m00 * tx + m01 * ty)], dim=1)
    row1 = torch.stack([m10, m11, -(m10 * tx + m11 * ty)], dim=1)
    return torch.stack([row0, row1], dim=1)


class DeviceAugment:
    """Random augmentation + ImageNet normalisation of uint8 batches, on ``device``."""

    def __init__(
        self,
        params: AugmentParams,
        *,
        device: torch.device | str,
        seed: int,
        channels_last: bool = False,
    ) -> None:
        self.params = params
        self.device = torch.device(device)
        self.seed = int(seed)
        self.channels_last = channels_last
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return f"DeviceAugment({self.params}, device={self.device}, seed={self.seed})"

    def train_batch(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 1, H, W]`` on any device -> augmented float32 ``[B, 3, H, W]``."""
        x = self._to_unit_float(x)
        p = self.params
        b = x.shape[0]
        # One draw per batch for every parameter, used or not, so the stream stays aligned.
        u = torch.rand((b, 7), generator=self.generator, device=self.device)
        flip = u[:, 1] < p.hflip
        if p.warps:
            theta = affine_theta(
                angle=(2 * u[:, 0] - 1) * p.rotation,
                hflip=flip,
                scale=p.scale_min + u[:, 2] * (p.scale_max - p.scale_min),
                shift=(2 * u[:, 3:5] - 1) * p.translate,
                height=x.shape[-2],
                width=x.shape[-1],
            )
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        elif p.hflip > 0:
            # A flip alone is exact indexing; grid_sample would blur it by rounding error.
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if p.brightness or p.contrast:
            contrast = (1 + (2 * u[:, 6] - 1) * p.contrast).view(-1, 1, 1, 1)
            brightness = (1 + (2 * u[:, 5] - 1) * p.brightness).view(-1, 1, 1, 1)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * contrast + mean).mul_(brightness).clamp_(0.0, 1.0)
        return self._normalise(x)

    def eval_batch(self, x: torch.Tensor, *, hflip: bool = False) -> torch.Tensor:
        """No augmentation: normalisation only, optionally flipped (test-time augmentation)."""
        x = self._to_unit_float(x)
        if hflip:
            x = x.flip(-1)
        return self._normalise(x)

    def state_dict(self) -> dict[str, Any]:
        """The generator state (a uint8 tensor, loadable with weights_only=True)."""
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu())

    # ------------------------------------------------------------------ internals

    def _to_unit_float(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected a [B, 1, H, W] or [B, 3, H, W] batch, got {tuple(x.shape)}")
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            return x.float().div_(255.0)
        return x.float()

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # [B, 1, H, W] broadcasts against the per-channel statistics: the grey channel is
        # replicated by the subtraction itself, never copied on its own.
        out = (x - self._mean).div_(self._std)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out
