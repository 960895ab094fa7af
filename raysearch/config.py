"""Config: YAML -> validated, frozen dataclasses. The one place that knows the file formats.

Two files are read here:

* a **trial config** (``raysearch train CONFIG.yaml``): one fixed set of hyperparameters;
* a **search space** (``raysearch tune SPACE.yaml``): data, resources, search, scheduler, storage,
  fixed trial settings and the distributions to explore.

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
        _check_choice("arch", self.arch, _architectures())
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("class_weighting", self.class_weighting, CLASS_WEIGHTINGS)
        _check_choice("fail_mode", self.fail_mode, ("raise", "nan"))
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
        return _build(cls, data, path=path)


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


@dataclass(frozen=True)
class SearchConfig:
    algorithm: str = "tpe"
    seed: int = 0
    num_samples: int = 8
    points_to_evaluate: tuple[dict, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("search.algorithm", self.algorithm, ("tpe", "random"))
        if self.num_samples < 1:
            raise ConfigError(f"search.num_samples must be >= 1, got {self.num_samples!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    kind: str = "asha"
    max_epochs: int = 30
    grace_period: int = 3
    reduction_factor: float = 3.0

    def __post_init__(self) -> None:
        _check_choice("scheduler.kind", self.kind, ("asha", "fifo"))
        if self.max_epochs < 1:
            raise ConfigError(f"scheduler.max_epochs must be >= 1, got {self.max_epochs!r}")
        if not 1 <= self.grace_period <= self.max_epochs:
            raise ConfigError(
                "scheduler: `1 <= grace_period <= max_epochs` must hold, but got "
                f"grace_period={self.grace_period!r}, max_epochs={self.max_epochs!r}"
            )
        if self.reduction_factor <= 1:
            raise ConfigError(
                f"scheduler.reduction_factor must be > 1, got {self.reduction_factor!r}"
            )


DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int", "constant")


@dataclass(frozen=True)
class Param:
    """One searchable parameter: a distribution, optionally only when other parameters match."""

    name: str
    kind: str
    values: tuple = ()  # choice values, or the constant as a 1-tuple
    low: float | None = None
    high: float | None = None
    step: float | None = None
    when: tuple[tuple[str, tuple], ...] = ()  # (param, allowed values) pairs, all must hold

    def applies(self, sampled: dict[str, Any]) -> bool:
        return all(sampled.get(k) in allowed for k, allowed in self.when)


@dataclass(frozen=True)
class SearchSpace:
    name: str
    data: DataConfig
    resources: ResourcesConfig
    search: SearchConfig
    scheduler: SchedulerConfig
    storage: str
    trial: dict[str, Any]  # fixed TrialConfig values shared by every trial
    space: tuple[Param, ...]

    def trial_config(self, sampled: dict[str, Any]) -> TrialConfig:
        """The full TrialConfig of one trial: fixed values, then sampled ones, then max_epochs."""
        merged = {**self.trial, **sampled, "max_epochs": self.scheduler.max_epochs}
        return TrialConfig.from_dict(merged, path="trial")

    @property
    def experiment_dir(self) -> str:
        from raysearch.storage import join

        return join(self.storage, self.name)

    @property
    def cache_dir(self) -> str:
        from raysearch.storage import join

        return self.data.cache_dir or join(self.storage, "cache")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "storage": self.storage}
        out["data"] = dataclasses.asdict(self.data)
        out["resources"] = dataclasses.asdict(self.resources)
        search = dataclasses.asdict(self.search)
        search["points_to_evaluate"] = [dict(p) for p in self.search.points_to_evaluate]
        out["search"] = search
        out["scheduler"] = dataclasses.asdict(self.scheduler)
        out["trial"] = dict(self.trial)
        out["space"] = {p.name: _param_to_yaml(p) for p in self.space}
        return out


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
        "name": _typed("name", raw.get("name", "train"), str),
        "storage": _norm_path(_typed("storage", raw.get("storage", "reports"), str)),
        "data": _build(DataConfig, raw.get("data") or {}, path="data"),
        "resources": _build(ResourcesConfig, raw.get("resources") or {}, path="resources"),
    }
    rest["data"] = dataclasses.replace(rest["data"], root=_norm_path(rest["data"].root))
    return cfg, rest


def load_search_space(path: str, **overrides: Any) -> SearchSpace:
    """Read and validate a search-space YAML. ``overrides`` are CLI flags (None = not given)."""
    raw = load_yaml(path)
    return parse_search_space(raw, source=path, **overrides)


TOP_KEYS = ("name", "data", "resources", "search", "scheduler", "storage", "trial", "space")


def parse_search_space(
    raw: dict[str, Any],
    *,
    source: str = "<spec>",
    data_root: str | None = None,
    name: str | None = None,
    storage: str | None = None,
    num_samples: int | None = None,
    max_concurrent: int | None = None,
) -> SearchSpace:
    _no_unknown(raw, TOP_KEYS, "")
    if "space" not in raw:
        raise ConfigError(f"{source}: missing key `space` (the parameters to search)")
    data = dict(_mapping(raw.get("data"), "data"))
    if data_root is not None:
        data["root"] = data_root
    data_cfg = _build(DataConfig, data, path="data")
    data_cfg = dataclasses.replace(
        data_cfg,
        root=_norm_path(data_cfg.root),
        cache_dir=_norm_path(data_cfg.cache_dir) if data_cfg.cache_dir else None,
    )
    resources = dict(_mapping(raw.get("resources"), "resources"))
    if max_concurrent is not None:
        resources["max_concurrent"] = max_concurrent
    search = dict(_mapping(raw.get("search"), "search"))
    if num_samples is not None:
        search["num_samples"] = num_samples
    points = search.get("points_to_evaluate", [])
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError("search.points_to_evaluate must be a list of mappings")
    search["points_to_evaluate"] = tuple(points)
    trial = dict(_mapping(raw.get("trial"), "trial"))
    trial_keys = {f.name for f in fields(TrialConfig)}
    _no_unknown(trial, trial_keys, "trial")
    if "max_epochs" in trial:
        raise ConfigError("trial.max_epochs is set by scheduler.max_epochs; remove it from `trial`")
    space = _parse_space(_mapping(raw["space"], "space"), trial_keys)
    spec = SearchSpace(
        name=_typed("name", name if name is not None else raw.get("name", "search"), str),
        data=data_cfg,
        resources=_build(ResourcesConfig, resources, path="resources"),
        search=_build(SearchConfig, search, path="search"),
        scheduler=_build(SchedulerConfig, _mapping(raw.get("scheduler"), "scheduler"), path="scheduler"),
        storage=_norm_path(_typed("storage", storage or raw.get("storage", "reports"), str)),
        trial=trial,
        space=space,
    )
    if not spec.name or "/" in spec.name:
        raise ConfigError(f"name must be a non-empty folder name without '/', got {spec.name!r}")
    _check_space_consistency(spec)
    return spec


def _parse_space(raw: dict[str, Any], trial_keys: set[str]) -> tuple[Param, ...]:
    params: list[Param] = []
    for name, spec in raw.items():
        path = f"space.{name}"
        if name not in trial_keys or name == "max_epochs":
            allowed = ", ".join(sorted(trial_keys - {"max_epochs"}))
            raise ConfigError(f"unknown key `{path}`; allowed parameters: {allowed}")
        if not isinstance(spec, dict):
            params.append(Param(name=name, kind="constant", values=(spec,)))
            continue
        when_raw = spec.get("when", {})
        kinds = [k for k in spec if k != "when"]
        unknown = [k for k in kinds if k not in DISTRIBUTIONS + ("step",)]
        if unknown:
            raise ConfigError(
                f"unknown key `{path}.{unknown[0]}`; allowed: {', '.join(DISTRIBUTIONS)}, step, when"
            )
        dist = [k for k in kinds if k in DISTRIBUTIONS]
        if len(dist) != 1:
            raise ConfigError(
                f"`{path}` needs exactly one distribution ({', '.join(DISTRIBUTIONS)}), got {dist or 'none'}"
            )
        kind = dist[0]
        arg = spec[kind]
        when = _parse_when(when_raw, f"{path}.when", {p.name for p in params})
        step = spec.get("step")
        if step is not None and kind not in ("int", "uniform"):
            raise ConfigError(f"`{path}.step` is only allowed with int or uniform")
        if kind == "constant":
            params.append(Param(name=name, kind=kind, values=(arg,), when=when))
        elif kind == "choice":
            if not isinstance(arg, list) or not arg:
                raise ConfigError(f"`{path}.choice` must be a non-empty list, got {arg!r}")
            for v in arg:
                if not isinstance(v, (str, int, float, bool)) and v is not None:
                    raise ConfigError(f"`{path}.choice` values must be scalars, got {v!r}")
            params.append(Param(name=name, kind=kind, values=tuple(arg), when=when))
        else:
            if not (isinstance(arg, list) and len(arg) == 2):
                raise ConfigError(f"`{path}.{kind}` must be a list [low, high], got {arg!r}")
            low, high = arg
            for bound, v in (("low", low), ("high", high)):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConfigError(f"`{path}.{kind}` {bound} must be a number, got {v!r}")
            if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
                raise ConfigError(f"`{path}.int` bounds must be integers, got {arg!r}")
            if not low < high:
                raise ConfigError(f"`{path}.{kind}`: `low < high` must hold, but got ({low=}, {high=})")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"`{path}.loguniform`: low must be > 0, got {low!r}")
            params.append(
                Param(name=name, kind=kind, low=low, high=high, step=step, when=when)
            )
    if not params:
        raise ConfigError("`space` is empty: give at least one parameter")
    return tuple(params)


def _parse_when(raw: Any, path: str, known: set[str]) -> tuple[tuple[str, tuple], ...]:
    if not isinstance(raw, dict):
        raise ConfigError(f"`{path}` must be a mapping of parameter -> allowed values, got {raw!r}")
    out = []
    for k, v in raw.items():
        if k not in known:
            raise ConfigError(
                f"`{path}.{k}` refers to a parameter that is not defined earlier in `space`"
            )
        allowed = tuple(v) if isinstance(v, list) else (v,)
        out.append((k, allowed))
    return tuple(out)


def _check_space_consistency(spec: SearchSpace) -> None:
    """Every value a trial could get must make a valid TrialConfig; check choices and corners."""
    base = dict(spec.trial)
    for p in spec.space:
        candidates = list(p.values) if p.kind in ("choice", "constant") else [p.low, p.high]
        if p.kind == "int":
            candidates = [int(c) for c in candidates]
        for value in candidates:
            try:
                TrialConfig.from_dict(
                    {**base, p.name: value, "max_epochs": spec.scheduler.max_epochs},
                    path="trial",
                )
            except ConfigError as e:
                raise ConfigError(f"space.{p.name}: value {value!r} is invalid: {e}") from None
    for i, point in enumerate(spec.search.points_to_evaluate):
        names = {p.name for p in spec.space}
        unknown = sorted(set(point) - names)
        if unknown:
            raise ConfigError(
                f"search.points_to_evaluate[{i}]: unknown parameter `{unknown[0]}`; "
                f"the space defines: {', '.join(sorted(names))}"
            )
        try:
            spec.trial_config(point)
        except ConfigError as e:
            raise ConfigError(f"search.points_to_evaluate[{i}]: {e}") from None


def _param_to_yaml(p: Param) -> Any:
    if p.kind == "constant":
        out: dict[str, Any] = {"constant": p.values[0]}
    elif p.kind == "choice":
        out = {"choice": list(p.values)}
    else:
        out = {p.kind: [p.low, p.high]}
        if p.step is not None:
            out["step"] = p.step
    if p.when:
        out["when"] = {k: list(v) for k, v in p.when}
    return out


# ----------------------------------------------------------------------------- helpers


def _architectures() -> tuple[str, ...]:
    from raysearch.models import ARCHITECTURES

    return tuple(ARCHITECTURES)


def _check_choice(key: str, value: Any, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: unknown value {value!r}; allowed: {', '.join(map(str, allowed))}")


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"`{path}` must be a mapping, got {type(value).__name__}")
    return value


def _no_unknown(raw: dict[str, Any], allowed: Any, path: str) -> None:
    for key in raw:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"unknown key `{where}`; allowed: {', '.join(sorted(allowed))}")


def _typed(path: str, value: Any, typ: type) -> Any:
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


def _build(cls: type, data: dict[str, Any], *, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"`{path}` must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    _no_unknown(data, known, path)
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        kwargs[key] = _coerce(where, value, str(known[key].type))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if not path or msg.startswith(path) else f"{path}.{msg}") from None


def _norm_path(value: str) -> str:
    """Absolute local paths (Ray changes the working directory of trials); URLs stay as given."""
    if is_url(value):
        return value
    return os.path.abspath(os.path.expanduser(value))


__all__ = [
    "DataConfig",
    "Param",
    "ResourcesConfig",
    "SchedulerConfig",
    "SearchConfig",
    "SearchSpace",
    "TrialConfig",
    "load_search_space",
    "load_trial_config",
    "parse_search_space",
]
