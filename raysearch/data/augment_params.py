"""Data stage, augmentation settings: the ranges of the random augmentation, its named presets and
their overrides. Torch-free, so that a configuration is checked without importing torch; the
batched on-device augmentation that applies them is :mod:`raysearch.data.augment`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from raysearch.errors import ConfigError

__all__ = ["PRESETS", "AugmentParams", "resolve_augment"]


@dataclass(frozen=True)
class AugmentParams:
    """Ranges of the random augmentation; the defaults are the identity.

    rotation: uniform in +-degrees. hflip: probability of a horizontal flip. scale_min/max: isotropic
    zoom (> 1 enlarges the content, like a random resized crop). translate: uniform shift in +-
    fraction of the size, per axis. brightness/contrast: multiplicative factors uniform in 1 +- value.
    """

    rotation: float = 0.0
    hflip: float = 0.0
    scale_min: float = 1.0
    scale_max: float = 1.0
    translate: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{f.name} must be a number, got {value!r}", key=f.name)
            if not math.isfinite(value):
                raise ConfigError(f"{f.name} must be finite, got {value!r}", key=f.name)
        _check_range("rotation", self.rotation, 0.0, 180.0)
        _check_range("hflip", self.hflip, 0.0, 1.0)
        _check_range("translate", self.translate, 0.0, 0.5)
        _check_range("brightness", self.brightness, 0.0, 1.0)
        _check_range("contrast", self.contrast, 0.0, 1.0)
        for name in ("scale_min", "scale_max"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}", key=name)
        if not self.scale_min <= self.scale_max:
            raise ConfigError(
                "augment `scale_min <= scale_max` must hold, "
                f"but got scale_min={self.scale_min!r}, scale_max={self.scale_max!r}"
            )

    @property
    def warps(self) -> bool:
        """True when any geometry beyond a flip is random (needs grid_sample)."""
        return bool(self.rotation or self.translate or self.scale_min != 1 or self.scale_max != 1)


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in [{low:g}, {high:g}], got {value!r}", key=name)


PRESETS: dict[str, AugmentParams] = {
    "none": AugmentParams(),
    "light": AugmentParams(
        rotation=10.0, hflip=0.5, scale_min=0.95, scale_max=1.05, translate=0.03
    ),
    # The MURA paper's augmentation: random lateral flips and rotations up to 30 degrees.
    "mura": AugmentParams(rotation=30.0, hflip=0.5),
    "strong": AugmentParams(
        rotation=30.0,
        hflip=0.5,
        scale_min=0.85,
        scale_max=1.15,
        translate=0.1,
        brightness=0.2,
        contrast=0.2,
    ),
}


def resolve_augment(preset: str = "mura", **overrides: Any) -> AugmentParams:
    """The named preset with individual parameters replaced by ``overrides``."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown augment preset {preset!r}; allowed: {', '.join(PRESETS)}")
    allowed = [f.name for f in dataclasses.fields(AugmentParams)]
    unknown = [k for k in overrides if k not in allowed]
    if unknown:
        raise ConfigError(
            f"unknown augment parameter {unknown[0]!r}; allowed: {', '.join(allowed)}"
        )
    return dataclasses.replace(PRESETS[preset], **overrides)
