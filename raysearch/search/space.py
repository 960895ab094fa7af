"""Search stage, the search-space file (``raysearch tune SPACE.yaml``) -> a :class:`SearchSpace`.

The file names the data, the resources, the search, the scheduler, the storage, the trial
settings every trial shares, and one distribution per searched parameter (``space``), optionally
applying only when earlier parameters match (``when``). Validation happens before Ray starts;
every error names the key path and what is allowed (see :mod:`raysearch.config`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any

from raysearch.config import (
    MAX_EPOCHS,
    MAX_NUM_SAMPLES,
    MAX_SEED,
    SEARCH_SPACES_DIR,
    DataConfig,
    ResourcesConfig,
    TrialConfig,
    build,
    check_choice,
    check_config_command,
    check_range,
    load_yaml,
    mapping,
    no_unknown,
    norm_path,
    resolve_config_path,
    typed,
)
from raysearch.errors import ConfigError
from raysearch.storage import check_name

__all__ = [
    "DISTRIBUTIONS",
    "Param",
    "SchedulerConfig",
    "SearchConfig",
    "SearchSpace",
    "check_point",
    "load_search_space",
    "parse_search_space",
    "write_starter_space",
]


@dataclass(frozen=True)
class SearchConfig:
    algorithm: str = "tpe"
    seed: int = 0
    num_samples: int = 8
    points_to_evaluate: tuple[dict, ...] = ()

    def __post_init__(self) -> None:
        check_choice("search.algorithm", self.algorithm, ("tpe", "random"))
        check_range("search.num_samples", self.num_samples, 1, MAX_NUM_SAMPLES)
        check_range("search.seed", self.seed, 0, MAX_SEED)


@dataclass(frozen=True)
class SchedulerConfig:
    kind: str = "asha"
    max_epochs: int = 30
    grace_period: int = 3
    reduction_factor: float = 3.0

    def __post_init__(self) -> None:
        check_choice("scheduler.kind", self.kind, ("asha", "fifo"))
        check_range("scheduler.max_epochs", self.max_epochs, 1, MAX_EPOCHS)
        if not 1 <= self.grace_period <= self.max_epochs:
            raise ConfigError(
                "scheduler: `1 <= grace_period <= max_epochs` must hold, but got "
                f"grace_period={self.grace_period!r}, max_epochs={self.max_epochs!r}"
            )
        # Past 100 every rung keeps only its best trial: a typo, not a schedule.
        if not 1 < self.reduction_factor <= 100:
            raise ConfigError(
                f"scheduler.reduction_factor must be in (1, 100], got {self.reduction_factor!r}"
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


def load_search_space(path: str, **overrides: Any) -> SearchSpace:
    """Read and validate a search-space YAML. ``overrides`` are CLI flags (None = not given).

    ``path`` is a file, a URL, or the name of a shipped space (``demo``, ``mura``, also as
    ``search_spaces/mura.yaml`` from any working directory; see ``config.SEARCH_SPACES_DIR``).
    """
    path = resolve_config_path(path, SEARCH_SPACES_DIR)
    check_config_command(path, None, "tune")
    raw = load_yaml(path)
    check_config_command(path, raw, "tune")  # a trial config: `raysearch train`, said so
    return parse_search_space(raw, source=path, **overrides)


def write_starter_space(path: str = "search_space.yaml", *, template: str = "demo",
                        overwrite: bool = False) -> str:
    """``raysearch init``: write the shipped search space ``template`` (``demo``: a CPU search
    on the built-in demo data; ``mura``: the GPU search on MURA) to ``path``, to edit and run.

    Returns ``path``. Raises :class:`ConfigError` for an unknown template, or when ``path``
    exists and ``overwrite`` is not set (a file is never replaced by surprise).
    """
    from raysearch.config import packaged
    from raysearch.storage import atomic_write_bytes, exists, is_url, read_bytes

    names = packaged(SEARCH_SPACES_DIR)
    if template not in names:
        raise ConfigError(f"--template: unknown value {template!r}; allowed: {', '.join(names)}")
    if exists(path) and not overwrite:
        raise ConfigError(f"{path} exists; pick another path, or --force to replace it")
    parent = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    if not is_url(path) and not os.path.isdir(parent):  # a typo must not create folders
        raise ConfigError(f"folder {os.path.dirname(path) or parent} does not exist; create it "
                          "first, or pick another path")
    atomic_write_bytes(path, read_bytes(f"{SEARCH_SPACES_DIR}/{template}.yaml"))
    return path


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
    no_unknown(raw, TOP_KEYS, "")
    if "space" not in raw:
        raise ConfigError(f"{source}: missing key `space` (the parameters to search)")
    data = dict(mapping(raw.get("data"), "data"))
    if data_root is not None:
        data["root"] = data_root
    data_cfg = build(DataConfig, data, path="data")
    data_cfg = dataclasses.replace(
        data_cfg,
        root=norm_path(data_cfg.root),
        cache_dir=norm_path(data_cfg.cache_dir) if data_cfg.cache_dir else None,
    )
    resources = dict(mapping(raw.get("resources"), "resources"))
    if max_concurrent is not None:
        resources["max_concurrent"] = max_concurrent
    search = dict(mapping(raw.get("search"), "search"))
    if num_samples is not None:
        search["num_samples"] = num_samples
    points = search.get("points_to_evaluate", [])
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError("search.points_to_evaluate must be a list of mappings")
    search["points_to_evaluate"] = tuple(points)
    trial = dict(mapping(raw.get("trial"), "trial"))
    trial_keys = {f.name for f in fields(TrialConfig)}
    no_unknown(trial, trial_keys, "trial")
    if "max_epochs" in trial:
        raise ConfigError("trial.max_epochs is set by scheduler.max_epochs; remove it from `trial`")
    space = _parse_space(mapping(raw["space"], "space"), trial_keys)
    # Weights files are read inside trials, whose working directory Ray changes: a relative path
    # is taken from where `raysearch tune` runs (as data.root is), wherever it is written.
    if isinstance(trial.get("weights"), str):
        trial["weights"] = weights_path(trial["weights"])
    space = tuple(dataclasses.replace(p, values=tuple(
        weights_path(v) if isinstance(v, str) else v for v in p.values))
        if p.name == "weights" else p for p in space)
    search["points_to_evaluate"] = tuple(
        {**point, "weights": weights_path(point["weights"])}
        if isinstance(point.get("weights"), str) else point
        for point in search["points_to_evaluate"])
    spec = SearchSpace(
        name=typed("name", name if name is not None else raw.get("name", "search"), str),
        data=data_cfg,
        resources=build(ResourcesConfig, resources, path="resources"),
        search=build(SearchConfig, search, path="search"),
        scheduler=build(SchedulerConfig, mapping(raw.get("scheduler"), "scheduler"), path="scheduler"),
        storage=norm_path(typed("storage", storage or raw.get("storage", "reports"), str)),
        trial=trial,
        space=space,
    )
    check_name(spec.name, what="name")
    _check_space_consistency(spec)
    return spec


def weights_path(value: str) -> str:
    """A ``weights`` setting with a relative file path made absolute (``none``, ``imagenet``
    and URLs as given)."""
    if value in ("none", "imagenet"):
        return value
    return norm_path(value)


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
        when = _parse_when(when_raw, f"{path}.when", params)
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
    for p in params:
        if p.when and not _can_apply(p, params):
            parents = ", ".join(f"`{k}`" for k in _ancestors(p, params))
            raise ConfigError(
                f"`space.{p.name}.when` can never hold: no values of {parents} meet it and their "
                f"own `when` conditions together, so `{p.name}` would never be sampled"
            )
    return tuple(params)


def _parse_when(raw: Any, path: str, earlier: list[Param]) -> tuple[tuple[str, tuple], ...]:
    """``when: {parent: [values]}`` -> ((parent, values), ...), checked against each parent.

    A parent must be a ``choice`` or ``constant`` parameter defined earlier, and every value must
    be one it can take: a condition no sample can meet would silently never sample the parameter.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"`{path}` must be a mapping of parameter -> allowed values, got {raw!r}")
    by_name = {p.name: p for p in earlier}
    out = []
    for k, v in raw.items():
        parent = by_name.get(k)
        if parent is None:
            raise ConfigError(
                f"`{path}.{k}` refers to a parameter that is not defined earlier in `space`"
            )
        if parent.kind not in ("choice", "constant"):
            raise ConfigError(
                f"`{path}.{k}`: `{k}` is {'an' if parent.kind == 'int' else 'a'} {parent.kind} "
                "parameter; `when` needs a choice or constant parameter, whose values can be listed"
            )
        choices = ", ".join(repr(c) for c in parent.values)
        allowed = tuple(v) if isinstance(v, list) else (v,)
        if not allowed:
            raise ConfigError(f"`{path}.{k}` must list at least one value of `{k}` ({choices})")
        for value in allowed:
            if isinstance(value, (dict, list)) or value not in parent.values:
                raise ConfigError(
                    f"`{path}.{k}`: {value!r} is not a value of `{k}`; its values: {choices}"
                )
        out.append((k, allowed))
    return tuple(out)


def _ancestors(p: Param, params: list[Param]) -> list[str]:
    """The parameters ``p``'s ``when`` depends on, directly or through theirs, in file order."""
    by_name = {q.name: q for q in params}
    seen: set[str] = set()
    todo = [k for k, _ in p.when]
    while todo:
        k = todo.pop()
        if k not in seen:
            seen.add(k)
            todo += [kk for kk, _ in by_name[k].when]
    return [q.name for q in params if q.name in seen]


def _can_apply(p: Param, params: list[Param]) -> bool:
    """Whether some values of ``p``'s ancestors, sampled as the searcher samples them (in file
    order, each only when its own ``when`` holds), meet ``p.when``."""
    by_name = {q.name: q for q in params}
    order = [by_name[k] for k in _ancestors(p, params)]
    tests = [(k, allowed) for q in [*order, p] for k, allowed in q.when]

    def options(a: Param) -> list:
        # Values that every condition treats alike are interchangeable: try one of each kind.
        kinds: dict[tuple[bool, ...], Any] = {}
        for value in a.values:
            kinds.setdefault(tuple(value in allowed for k, allowed in tests if k == a.name), value)
        return list(kinds.values())

    def search(i: int, sampled: dict[str, Any]) -> bool:
        if i == len(order):
            return p.applies(sampled)
        a = order[i]
        if not a.applies(sampled):  # not sampled in this branch, as in tune.DefineByRun
            return search(i + 1, sampled)
        return any(search(i + 1, {**sampled, a.name: v}) for v in options(a))

    return search(0, {})


def _check_space_consistency(spec: SearchSpace) -> None:
    """Every value a trial could get must make a valid TrialConfig; check choices and corners.

    Each error names where the bad value is written: ``trial.batch_size ...`` for the `trial`
    block (checked first, on its own), ``space.batch_size ...`` for a value of the space, and
    ``search.points_to_evaluate[0].batch_size ...`` for a starting point. A value that is fine
    on its own but clashes with another setting says which value of which parameter it is.
    """

    def check(values: dict[str, Any]) -> None:
        # path="": each error keeps its bare key, and the caller says where it came from.
        build(TrialConfig, {**values, "max_epochs": spec.scheduler.max_epochs}, path="")

    # --- the trial block on its own, the defaults filling in the rest
    base = dict(spec.trial)
    try:
        check(base)
    except ConfigError as e:
        # A default that the space replaces may be what clashes with `trial`: that is fine.
        # (`trial` values stay: they are what a parameter whose `when` does not hold gets.)
        reference = {**{p.name: _candidates(p)[0] for p in spec.space}, **base}
        try:
            check(reference)
        except ConfigError:
            raise e.under("trial") from None
        base = reference

    # --- every value (choices, or both ends of a range) of each parameter
    for p in spec.space:
        for value in _candidates(p):
            try:
                check({**base, p.name: value})
            except ConfigError as e:
                if e.key == p.name:
                    raise e.under("space") from None
                raise ConfigError(
                    f"space.{p.name}: value {value!r} does not fit the other settings: {e}"
                ) from None

    # --- the starting points, each on top of the trial block
    names = {p.name for p in spec.space}
    for i, point in enumerate(spec.search.points_to_evaluate):
        where = f"search.points_to_evaluate[{i}]"
        unknown = sorted(set(point) - names)
        if unknown:
            raise ConfigError(
                f"{where}: unknown parameter `{unknown[0]}`; "
                f"the space defines: {', '.join(sorted(names))}"
            )
        check_point(spec.space, point, where=where)
        try:
            check({**spec.trial, **point})
        except ConfigError as e:
            if e.key in point:
                raise e.under(where) from None
            raise ConfigError(f"{where}: {e}") from None


def check_point(space: tuple[Param, ...], point: dict[str, Any], *, where: str) -> None:
    """Check one starting point (``search.points_to_evaluate[i]``) against the space.

    Each value must be one its parameter can take: one of a ``choice``'s values, the
    ``constant`` itself, or a number within ``[low, high]`` of a range (an integer for ``int``,
    on the ``step`` grid when one is given). A parameter set by the point must also apply: its
    ``when`` must hold for the values the point (or a constant) gives its parents, or Optuna would
    drop the value without a word. A parent the point leaves out is sampled, so it may still hold.
    Raises :class:`ConfigError` naming ``where`` and the key, e.g.
    ``search.points_to_evaluate[0].arch: 'densenet169' is not one of the choices (...)``.
    """
    by_name = {p.name: p for p in space}
    known = {q.name: q.values[0] for q in space if q.kind == "constant" and not q.when}
    known.update(point)
    for name, value in point.items():
        p = by_name[name]
        key = f"{where}.{name}"
        if p.kind in ("choice", "constant"):
            if isinstance(value, (dict, list)) or not _in_values(value, p.values):
                what = "one of the choices" if p.kind == "choice" else "the constant"
                raise ConfigError(
                    f"{key}: {value!r} is not {what} ({', '.join(map(repr, p.values))})", key=key
                )
        else:
            _check_in_range(p, value, key)
        # the parameter must be sampled for this point: every `when` that the point decides
        for parent, allowed in p.when:
            if parent in known and not _in_values(known[parent], allowed):
                raise ConfigError(
                    f"{key}: set, but `space.{name}.when` needs {parent} in "
                    f"[{', '.join(map(repr, allowed))}] and this point's {parent} is "
                    f"{known[parent]!r}; the value would be ignored", key=key
                )


def _in_values(value: Any, values: tuple) -> bool:
    """``value in values`` where True is not 1 and 1 is not True (YAML keeps them apart too)."""
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in values)


def _check_in_range(p: Param, value: Any, key: str) -> None:
    """A starting point's value of a range parameter: a number in [low, high], on the grid."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}", key=key)
    if p.kind == "int" and not float(value).is_integer():
        raise ConfigError(f"{key} must be an integer (`space.{p.name}` is int), got {value!r}",
                          key=key)
    if not p.low <= value <= p.high:
        raise ConfigError(
            f"{key}: {value!r} is outside `space.{p.name}.{p.kind}` [{p.low!r}, {p.high!r}]",
            key=key,
        )
    if p.step is not None:
        k = (value - p.low) / p.step
        if abs(k - round(k)) > 1e-9 * max(1.0, abs(k)):
            raise ConfigError(
                f"{key}: {value!r} is not on the grid of `space.{p.name}` ({p.low!r} + k * "
                f"{p.step!r})", key=key
            )


def _candidates(p: Param) -> list[Any]:
    """The values of ``p`` to check: every choice, or both ends of a range."""
    if p.kind in ("choice", "constant"):
        return list(p.values)
    if p.kind == "int":
        return [int(p.low), int(p.high)]
    return [p.low, p.high]


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
