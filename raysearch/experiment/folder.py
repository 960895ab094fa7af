"""The experiment folder: its name and layout, its marker and info (``experiment.json``),
guarded deletion, paths stored relative to it, and finding experiments in a storage root."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any

from raysearch.errors import (
    ConfigError,
    ExperimentStateError,
    name_some,
)
from raysearch.storage import (
    atomic_write_text,
    check_name,
    exists,
    get_fs,
    is_url,
    join,
    read_bytes,
)

MARKER = "experiment.json"


LOCK_NAME = ".raysearch.lock"


TRUST_NAME = "raysearch-trust.json"


def experiment_dir(storage: str, name: str) -> str:
    """``<storage>/<name>`` for a checked name (a local absolute path or a URL)."""
    return join(storage, check_name(name))


def is_experiment(exp_dir: str) -> bool:
    """True when ``exp_dir`` holds raysearch's marker file (``experiment.json``)."""
    return exists(join(exp_dir, MARKER))


def read_info(exp_dir: str) -> dict[str, Any]:
    """``experiment.json`` as a dict; :class:`ExperimentStateError` if missing or not JSON."""
    uri = join(exp_dir, MARKER)
    try:
        info = json.loads(read_bytes(uri))
    except FileNotFoundError:
        raise ExperimentStateError(f"{exp_dir} is not a raysearch experiment (no {MARKER})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ExperimentStateError(f"{uri} is not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise ExperimentStateError(f"{uri} does not hold a JSON object")
    return info


def update_info(exp_dir: str, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``experiment.json`` (created if missing), atomically. Returns it."""
    from raysearch import __version__

    try:
        info = read_info(exp_dir)
    except ExperimentStateError:
        info = {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    info.setdefault("raysearch", __version__)
    info.setdefault("created", now)
    info.update(fields)
    info["updated"] = now
    atomic_write_text(join(exp_dir, MARKER), json.dumps(info, indent=1, default=str))
    return info


def relative(exp_dir: str, uri: str | None) -> str | None:
    """``uri`` relative to ``exp_dir`` when it lies inside it (else unchanged)."""
    if uri is None:
        return None
    base = exp_dir.rstrip("/") + "/"
    return uri.removeprefix(base)


def cache_dir(exp_dir: str, info: dict[str, Any]) -> str:
    """Where to find (or build) an experiment's image caches: its own setting
    (``experiment.json``'s ``cache_dir``) while it is reachable; for a moved experiment,
    ``cache/`` beside it (the default place)."""
    saved = info.get("cache_dir")
    beside = f"{exp_dir.rstrip('/').rsplit('/', 1)[0]}/cache"
    if saved and (is_url(str(saved)) or os.path.isdir(str(saved))):
        return str(saved)
    return beside if saved else join(exp_dir, "cache")


def resolve(exp_dir: str, path: str | None) -> str | None:
    """The URI of ``path`` as stored in an experiment's files, for the experiment at ``exp_dir``.

    Relative paths are joined onto ``exp_dir``. An absolute path or URL from an experiment that
    has since moved (experiments written before paths were relative) is re-rooted at ``exp_dir``
    from its ``train-<id>/...`` part, when the original is gone and the re-rooted one exists.
    """
    if not isinstance(path, str) or not path:
        return None  # None, or a NaN from a Parquet column
    if not (is_url(path) or os.path.isabs(path)):
        return join(exp_dir, path)
    if exists(path):
        return path
    parts = path.rstrip("/").split("/")
    for i, part in enumerate(parts):
        if part.startswith("train-"):
            moved = join(exp_dir, *parts[i:])
            if exists(moved):
                return moved
            break
    return path


def check_writable(exp_dir: str) -> None:
    """Refuse (:class:`ExperimentStateError`) to write an experiment into a folder that exists,
    holds anything besides a lock, and is not a raysearch experiment."""
    fs, path = get_fs(exp_dir)
    if not fs.exists(path) or is_experiment(exp_dir):
        return
    others = [c for c in fs.ls(path, detail=False) if c.rstrip("/").rsplit("/", 1)[-1] != LOCK_NAME]
    if others:
        raise ExperimentStateError(
            f"{exp_dir} exists and is not a raysearch experiment (no {MARKER}); choose another "
            "--name or storage"
        )


def remove_experiment(exp_dir: str, *, storage: str, dry_run: bool = False) -> None:
    """Delete an experiment's contents (its lock excepted), after checking that ``exp_dir`` is a
    direct child of ``storage`` and holds the marker. Raises :class:`ExperimentStateError` and
    deletes nothing otherwise. A folder that holds nothing but a lock counts as empty.
    ``dry_run`` makes the checks only: callers check first and delete after every other check.
    """
    parent = join(storage).rstrip("/")
    target = join(exp_dir).rstrip("/")
    name = target.rsplit("/", 1)[-1]
    if target.rsplit("/", 1)[0] != parent or name in ("", ".", "..") or target == parent:
        raise ExperimentStateError(
            f"refusing to delete {exp_dir}: it is not a folder directly inside the storage {storage}"
        )
    check_name(name)
    fs, path = get_fs(target)
    if not fs.exists(path):
        return
    children = [c for c in fs.ls(path, detail=False) if c.rstrip("/").rsplit("/", 1)[-1] != LOCK_NAME]
    if not children:
        return
    if not is_experiment(target):
        raise ExperimentStateError(
            f"refusing to delete {exp_dir}: it is not a raysearch experiment (no {MARKER}); "
            "choose another --name, or remove that folder yourself"
        )
    if dry_run:
        return
    # The marker goes last, so a deletion that dies half-way still leaves a recognisable experiment.
    marker = f"{path.rstrip('/')}/{MARKER}"
    for child in children:
        if child.rstrip("/") != marker:
            fs.rm(child, recursive=True)
    fs.rm(marker)


def find_experiment(experiment: str | None, *, storage: str = "reports") -> str:
    """The experiment folder to ensemble: ``None`` -> the most recent one under ``storage``
    (newest ``experiment.json``); a bare name -> ``storage/name``; a path or URL as given.

    Raises :class:`ConfigError` when there is none, listing the experiments of the folder looked
    in (``storage`` for a bare name, the path's parent folder for a path or URL)."""
    if experiment is None:
        found = list_experiments(storage)
        if not found:
            raise ConfigError(
                f"no experiment under {storage} (no */experiment.json); run `raysearch tune` "
                "first or name one with --experiment"
            )
        return max(found, key=lambda item: (item[1], item[0]))[0]
    # A name with a trailing slash (`demo/`, as shells complete it) is still a name.
    name = experiment.rstrip("/" + os.sep) or experiment
    bare = not is_url(experiment) and "/" not in name and os.sep not in name
    candidates = [join(storage, name)] if bare else []
    candidates.append(experiment if is_url(experiment) else join(experiment))
    for path in candidates:
        if exists(join(path, "experiment.json")):
            return path
    for path in candidates:  # an experiment's ensemble folder given for the experiment
        parent = path.rstrip("/").rsplit("/", 1)[0]
        if exists(join(path, "members.parquet")) and exists(join(parent, "experiment.json")):
            raise ConfigError(f"{path} is an ensemble folder, not an experiment; its experiment "
                              f"is {parent}")
    # The hint lists the folder the user pointed at: ``storage`` for a bare name, else the
    # parent of the path given (``runs/tyni`` lists ``runs``, not ``reports``).
    where = storage if bare else candidates[-1].rstrip("/").rsplit("/", 1)[0]
    known = [uri.rstrip("/").rsplit("/", 1)[-1] for uri, _ in list_experiments(where)]
    listing = (
        f"experiments under {where}: {name_some(sorted(known), limit=8)}"
        if known
        else f"there are none under {where}"
    )
    raise ConfigError(f"no experiment at {candidates[0]} (no experiment.json); {listing}")


def list_experiments(storage: str) -> list[tuple[str, float]]:
    """(folder URI, modification time of its experiment.json) for every experiment in storage."""
    fs, root = get_fs(storage)
    if not fs.isdir(root):
        return []
    out = []
    for path in fs.glob(root.rstrip("/") + "/*/experiment.json"):
        name = path.rstrip("/").rsplit("/", 2)[-2]
        out.append((join(storage, name), _mtime(fs, path)))
    return out


def _mtime(fs, path: str) -> float:
    try:
        return fs.modified(path).timestamp()
    except (NotImplementedError, AttributeError, KeyError):
        info = fs.info(path)
        for key in ("mtime", "updated", "LastModified", "created"):
            value = info.get(key)
            if isinstance(value, (int, float)):
                return float(value)
            if hasattr(value, "timestamp"):
                return value.timestamp()
        return 0.0


def check_model_folder(path: str) -> str:
    """``path`` without a trailing slash, when it is a folder a predictor can be built from: an
    ensemble folder (``members.parquet``) or an experiment (``experiment.json``). Reads no file
    and imports nothing heavy, so ``predict``, ``export`` and ``serve`` answer a wrong folder in
    a second. Raises :class:`ConfigError` naming the path otherwise."""
    path = str(path).rstrip("/")
    if exists(join(path, "members.parquet")) or exists(join(path, MARKER)):
        return path
    if not exists(path):
        raise ConfigError(f"no such ensemble or experiment folder: {path}")
    raise ConfigError(f"{path} is neither an ensemble folder (members.parquet) nor an experiment "
                      "(experiment.json)")
