"""Explain stage, maps in the original image frame, and the ensemble map.

Members run at their own image sizes on a letterboxed copy of the image
(:func:`raysearch.data.images.letterbox`: zero-padded to a centred square of side max(W, H),
then resized to S x S). A member's map covers that S x S input, so it is brought back by the
inverse: resized (bilinear) to the square's side, then cropped to the W x H image. Maps of members
of different sizes then share one frame, the original pixels, where findings' boxes live too.

Never imports ray.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ensemble_map", "normalise", "sensitivity", "to_original"]


def to_original(raw: np.ndarray, *, width: int, height: int) -> np.ndarray:
    """A map ``[h, w]`` over a letterboxed square input, as float32 ``[height, width]`` over the
    original image: bilinear upsampling (``align_corners=False``, so cell centres stay where the
    network saw them) to the letterbox square, then the crop that removes its padding. Values are
    interpolated, not rescaled: an unnormalised map stays unnormalised."""
    side = max(width, height)
    ox, oy = (side - width) // 2, (side - height) // 2  # letterbox's paste offsets
    t = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)[0, 0]
    return up[oy : oy + height, ox : ox + width].numpy().copy()


def sensitivity(prob: float) -> float:
    """d sigmoid(z) / d z = p (1 - p): how much the ensemble's probability moves with a member's
    logit, per unit of member weight (the ensemble is the weighted mean of member sigmoids)."""
    return float(prob) * (1.0 - float(prob))


def ensemble_map(maps: Sequence[np.ndarray], *, weights: Sequence[float],
                 probs: Sequence[float]) -> np.ndarray:
    """The ensemble's map ``[H, W]`` in [0, 1] from its members' *unnormalised* maps (each already
    in the original frame): sum_m weight_m * p_m (1 - p_m) * map_m, normalised once by its maximum.

    A member's map explains its logit z_m; the ensemble probability is sum_m weight_m sigmoid(z_m),
    so d p / d z_m = weight_m p_m (1 - p_m) (the chain rule: a first-order attribution of the
    ensemble's probability to its members' evidence). A confident member (p near 0 or 1) moves the
    ensemble little and counts little. All zeros stay all zeros."""
    if not maps:
        raise ValueError("no member maps to combine")
    total = np.zeros_like(maps[0], dtype=np.float64)
    for m, w, p in zip(maps, weights, probs, strict=True):
        total += float(w) * sensitivity(p) * m.astype(np.float64)
    return normalise(total)


def normalise(m: np.ndarray) -> np.ndarray:
    """``m`` divided by its maximum (float32; zeros stay zeros). Dividing by the maximum, not
    min-max, keeps "no evidence" at 0."""
    peak = float(np.max(m)) if m.size else 0.0
    return (m / peak if peak > 0 else np.zeros_like(m)).astype(np.float32)
