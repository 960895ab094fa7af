"""Config: YAML -> validated, frozen dataclasses, and the checks both file formats share.

Two files are read by raysearch:

* a **trial config** (``raysearch train CONFIG.yaml``): one fixed set of hyperparameters, read
  here;
* a **search space** (``raysearch tune SPACE.yaml``), read in :mod:`raysearch.space` with the
  same checks and the same :class:`DataConfig` and :class:`ResourcesConfig`.

Validation happens once, at the edge, before Ray starts. Every error names the key path and what
is allowed. Inside Ray, a trial turns its plain dict back into the same :class:`TrialConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Any

import yaml

from raysearch.errors import ConfigError
from raysearch.storage import is_url, read_bytes

CLASS_WEIGHTINGS = ("none", "mura", "inverse", "balanced")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("plateau", "cosine")
# fp_bias b is added to the count of negative training images in `inverse`'s positive weight
# 1 + (N + b) / P. It must not be negative (that could make the weight <= 0); MURA has about 21k
# negative training images, so a bias past a million is a typo, not a setting.
MAX_FP_BIAS = 1e6
AUGMENT_KEYS = ("rotation", "hflip", "scale_min", "scale_max", "translate", "brightness", "contrast")


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs to train; travels inside every checkpoint.

    Defaults are the MURA paper's baseline (Rajpurkar et al. 2017): DenseNet-169 from ImageNet,
    320 px, flips and +-30 degree rotations, Adam at 1e-4, batch 8, lr /10 on plateau, weighted BCE.
    """

    arch: str = "densenet169"
    weights: str = "imagenet"
    dropout: float = 0.0
    image_size: int = 320
    batch_size: int = 8
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_schedule: str = "plateau"
    plateau_patience: int = 1
    warmup_epochs: int = 1
    max_epochs: int = 30
    early_stop_patience: int = 5
    # Training images (un-augmented) that re-estimate BatchNorm statistics before each
    # validation ("precise BN", see models.recompute_bn_stats); 0 keeps the running averages.
    precise_bn_images: int = 512
    class_weighting: str = "mura"
    fp_bias: float = 0.0
    augment: str = "mura"
    # Individual augmentation parameters; None means "take it from the preset".
    rotation: float | None = None
    hflip: float | None = None
    scale_min: float | None = None
    scale_max: float | None = None
    translate: float | None = None
    brightness: float | None = None
    contrast: float | None = None
    seed: int = 0
    # Fault injection for testing fault tolerance: raise at this epoch ("nan" makes the loss NaN).
    fail_at_epoch: int | None = None
    fail_mode: str = "raise"

    def __post_init__(self) -> None:
        check_choice("arch", self.arch, _architectures())
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("class_weighting", self.class_weighting, CLASS_WEIGHTINGS)
        check_choice("fail_mode", self.fail_mode, ("raise", "nan"))
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.image_size < 16:
            raise ConfigError(f"image_size must be >= 16, got {self.image_size!r}")
        for name in ("batch_size", "max_epochs", "early_stop_patience", "plateau_patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.fp_bias <= MAX_FP_BIAS:
            raise ConfigError(f"fp_bias must be in [0, {MAX_FP_BIAS:g}], got {self.fp_bias!r}")
        if self.precise_bn_images < 0:
            raise ConfigError(f"precise_bn_images must be >= 0, got {self.precise_bn_images!r}")
        self.augment_params()  # validates the preset and overrides
        if self.weights not in ("none", "imagenet") and not is_url(self.weights):
            # Trials run in another working directory: a relative weights path must be absolute.
            object.__setattr__(self, "weights", os.path.abspath(os.path.expanduser(self.weights)))

    def augment_params(self):
        from raysearch.augment import resolve_augment

        overrides = {k: getattr(self, k) for k in AUGMENT_KEYS if getattr(self, k) is not None}
        try:
            return resolve_augment(self.augment, **overrides)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"augment: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, path: str = "") -> TrialConfig:
        return build(cls, data, path=path)


@dataclass(frozen=True)
class DataConfig:
    root: str = "demo_data"
    val_fraction: float = 0.1
    seed: int = 0
    cache_dir: str | None = None  # default: <storage>/cache
    skip_bad: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction!r}")


@dataclass(frozen=True)
class ResourcesConfig:
    workers_per_trial: int = 1
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float | None = None  # None: 1 on CPU-only clusters, else a share of the node
    max_concurrent: int | None = None  # None: derived from the cluster
    max_failures: int = 2  # trial-level retries from the last checkpoint

    def __post_init__(self) -> None:
        if self.workers_per_trial < 1:
            raise ConfigError(
                f"resources.workers_per_trial must be >= 1, got {self.workers_per_trial!r}"
            )
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(
                f"resources.max_concurrent must be >= 1, got {self.max_concurrent!r}"
            )
        if self.max_failures < 0:
            raise ConfigError(f"resources.max_failures must be >= 0, got {self.max_failures!r}")


# ----------------------------------------------------------------------------- loading


def load_yaml(path: str) -> dict[str, Any]:
    try:
        raw = read_bytes(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_trial_config(path: str) -> tuple[TrialConfig, dict[str, Any]]:
    """Read ``raysearch train`` YAML: trial keys at the top, plus optional data/resources/storage/name."""
    raw = load_yaml(path)
    extra_keys = {"name", "data", "resources", "storage"}
    trial = {k: v for k, v in raw.items() if k not in extra_keys}
    cfg = TrialConfig.from_dict(trial)
    rest = {
        "name": typed("name", raw.get("name", "train"), str),
        "storage": norm_path(typed("storage", raw.get("storage", "reports"), str)),
        "data": build(DataConfig, raw.get("data") or {}, path="data"),
        "resources": build(ResourcesConfig, raw.get("resources") or {}, path="resources"),
    }
    rest["data"] = dataclasses.replace(rest["data"], root=norm_path(rest["data"].root))
    return cfg, rest


# ----------------------------------------------------------------------------- helpers


def _architectures() -> tuple[str, ...]:
    from raysearch.models import ARCHITECTURES

    return tuple(ARCHITECTURES)


def check_choice(key: str, value: Any, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: unknown value {value!r}; allowed: {', '.join(map(str, allowed))}")


def mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"`{path}` must be a mapping, got {type(value).__name__}")
    return value


def no_unknown(raw: dict[str, Any], allowed: Any, path: str) -> None:
    for key in raw:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"unknown key `{where}`; allowed: {', '.join(sorted(allowed))}")


def typed(path: str, value: Any, typ: type) -> Any:
    if not isinstance(value, typ):
        raise ConfigError(f"`{path}` must be a {typ.__name__}, got {value!r}")
    return value


_TYPE_NAMES = {"int": int, "float": float, "str": str, "bool": bool}


def _coerce(path: str, value: Any, annotation: str) -> Any:
    """Check ``value`` against a dataclass field annotation string (postponed annotations)."""
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"`{path}` must not be empty")
    base = annotation.replace(" | None", "").strip()
    if base.startswith("tuple"):
        return value
    typ = _TYPE_NAMES.get(base)
    if typ is None:
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:  # YAML reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
        raise ConfigError(f"`{path}` must be {base}, got {value!r}")
    return value


def build(cls: type, data: dict[str, Any], *, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"`{path}` must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    no_unknown(data, known, path)
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        kwargs[key] = _coerce(where, value, str(known[key].type))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if not path or msg.startswith(path) else f"{path}.{msg}") from None


def norm_path(value: str) -> str:
    """Absolute local paths (Ray changes the working directory of trials); URLs stay as given."""
    if is_url(value):
        return value
    return os.path.abspath(os.path.expanduser(value))


def __getattr__(name: str):
    # The search-space classes lived here before 2026-11-23. Ray pickles them with an experiment
    # (the searcher's parameters, the live view's spec in tuner.pkl), by this module's name.
    if name in _MOVED_TO_SPACE:
        from raysearch import space

        return getattr(space, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MOVED_TO_SPACE = ("Param", "SearchConfig", "SchedulerConfig", "SearchSpace")


__all__ = [
    "DataConfig",
    "ResourcesConfig",
    "TrialConfig",
    "build",
    "check_choice",
    "load_trial_config",
    "load_yaml",
    "mapping",
    "no_unknown",
    "norm_path",
    "typed",
]
