"""The experiment folder, and its one owner: every stage reads and writes an experiment through
here. Its name, its layout, its marker and info (``experiment.json``), one writer at a time, its
trials and their checkpoints, its results, and which of its files raysearch will hand to Ray to
unpickle.

An experiment lives at ``<storage>/<name>/`` (a local folder or a bucket prefix)::

    experiment.json          the marker: written by raysearch first, before anything else
    .raysearch.lock          held by the one run that writes the experiment (see ExperimentLock)
    raysearch-trust.json     HMAC-signed hashes of the Ray state files this machine wrote
    manifest.parquet         the data and the split
    search_space.yaml, trials.parquet, epochs.parquet, ensemble/
    train-<trial_id>/checkpoint_*/   each trial's checkpoints (Ray Train)
    tuner.pkl, experiment_state-*.json, searcher-state-*.pkl, ...   Ray Tune's own state

A **name** is one safe path component, wherever it comes from (a YAML file, ``--name``, a bench):
no separators, not ``.`` or ``..``, no control or glob characters. Before anything is removed,
:func:`remove_experiment` checks that the target is a direct child of the storage root and holds
the marker; callers remove only after every other check has passed.

Paths inside the experiment (checkpoints, the manifest) are stored relative to it, so a copied or
moved experiment (another disk, a bucket copied to a laptop) still works: :func:`resolve`.

**Trust.** ``Tuner.restore`` unpickles ``tuner.pkl``, the searcher state and the experiment state
(whose JSON carries cloudpickled objects), and Ray loads a failed trial's ``error.pkl``: whoever can
write the storage folder can run code on the machine that resumes the search. ``weights_only``
does not cover these. raysearch signs the SHA-256 of every such file it lets Ray write
(:func:`sign_ray_state`, an HMAC with a key kept outside the storage) and, before a resume,
refuses any such file it did not sign (:func:`verify_ray_state`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import getpass
import hashlib
import hmac
import io
import json
import os
import pickletools
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from raysearch.errors import (
    CheckpointError,
    ConfigError,
    ExperimentLockedError,
    ExperimentStateError,
    RaysearchError,
    first_line,
    name_some,
)
from raysearch.storage import (
    RESERVED_NAMES,
    atomic_write_text,
    check_name,
    exists,
    get_fs,
    is_url,
    join,
    read_bytes,
)

__all__ = [
    "CHECKPOINT_FILES",
    "EPOCH_COLUMNS",
    "LOCK_NAME",
    "MARKER",
    "RESERVED_NAMES",
    "TASK_FILE",
    "TRIAL_COLUMNS",
    "TRUST_NAME",
    "ExperimentLock",
    "TrialCheckpoint",
    "check_name",
    "check_ray_state_intact",
    "check_writable",
    "checkpoint_damage",
    "experiment_dir",
    "fail_on_restore_error",
    "find_experiment",
    "is_experiment",
    "latest_history",
    "list_experiments",
    "read_info",
    "read_manifest",
    "read_trial_checkpoint",
    "read_trials",
    "relative",
    "remove_experiment",
    "resolve",
    "results_tables",
    "run_checkpoints",
    "run_dir",
    "sign_ray_state",
    "trial_summary",
    "unfinished_trials",
    "update_info",
    "verify_ray_state",
    "write_results",
]

MARKER = "experiment.json"
LOCK_NAME = ".raysearch.lock"
TRUST_NAME = "raysearch-trust.json"


# ----------------------------------------------------------------------------- names and layout


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


# Every file a trial checkpoint holds (see raysearch.train.checkpoint); none of them may be empty.
# ``task.json`` (the task it predicts) is written too, but checkpoints from before tasks lack it.
TASK_FILE = "task.json"
CHECKPOINT_FILES = ("model.pt", "train_state.pt", "trial.json", "metrics.json", "history.json",
                    "val_predictions.parquet")


def checkpoint_damage(sizes: dict[str, int]) -> str | None:
    """Why a trial checkpoint folder whose files have these sizes (name -> bytes) cannot be used
    (a file missing or empty: cut short by a full disk or a killed writer), or None."""
    missing = [n for n in CHECKPOINT_FILES if n not in sizes]
    if missing:
        return f"{', '.join(missing)} missing"
    empty = [n for n in CHECKPOINT_FILES if sizes[n] == 0]
    if empty:
        return f"{', '.join(empty)} empty"
    return None


# ----------------------------------------------------------------------------- trials and checkpoints


def run_checkpoints(run_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """(checkpoint URI, its metrics.json) for every usable checkpoint a Train run still holds.

    A checkpoint with a missing, empty or unreadable file (being written when the driver died, or
    cut short by a full disk) is left out: it is neither a resume point nor an ensemble member.
    """
    fs, path = get_fs(run_dir)
    if not fs.exists(path):
        return []
    out = []
    for entry in sorted(fs.ls(path, detail=False)):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("checkpoint_") or name.endswith(".json"):
            continue  # Ray keeps checkpoint_manager_snapshot.json beside the checkpoint folders
        uri = join(run_dir, name)
        try:
            sizes = {
                f["name"].rstrip("/").rsplit("/", 1)[-1]: int(f.get("size") or 0)
                for f in fs.ls(entry, detail=True)
            }
            if checkpoint_damage(sizes):
                continue
            metrics = json.loads(read_bytes(join(uri, "metrics.json")))
        except (OSError, ValueError):
            continue
        out.append((uri, metrics))
    return out

def latest_history(ckpts: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every epoch a Train run reported: the ``history.json`` of its latest checkpoint."""
    if not ckpts:
        return []
    latest_uri, _ = max(ckpts, key=lambda c: c[1]["epoch"])
    return json.loads(read_bytes(join(latest_uri, "history.json")))


# ----------------------------------------------------------------------------- reading a checkpoint


@dataclass(frozen=True)
class TrialCheckpoint:
    """A trial's checkpoint read back: where it is (``checkpoint``, a full URI), the resolved
    trial config, the task it predicts, and (when read) its saved val predictions."""

    trial_id: str
    checkpoint: str
    config: Any  # raysearch.config.TrialConfig
    task: Any  # raysearch.data.dataset.Task
    val: Any = None  # pandas.DataFrame: val_predictions.parquet

    def __repr__(self) -> str:
        return (f"TrialCheckpoint({self.trial_id!r}, {self.config.arch} @ "
                f"{self.config.image_size}px, checkpoint={self.checkpoint!r})")


def _checkpoint_bytes(trial_id: str, checkpoint: str, name: str) -> bytes:
    uri = join(checkpoint, name)
    try:
        return read_bytes(uri)
    except FileNotFoundError:
        raise CheckpointError(
            f"trial {trial_id}: {name} is missing from its checkpoint {checkpoint}"
        ) from None
    except OSError as e:
        raise CheckpointError(f"trial {trial_id}: cannot read {uri} ({e})") from e


def read_trial_checkpoint(trial_id: str, checkpoint: str, *, with_val: bool = True) -> TrialCheckpoint:
    """Read a checkpoint's ``trial.json``, ``task.json`` (MURA's task for checkpoints written
    before tasks) and, with ``with_val``, its ``val_predictions.parquet`` (checked: the task's
    label and probability columns present, probabilities finite in [0, 1], no image twice).
    The weights are not read here (see ``raysearch.inference``). Every problem is a
    :class:`CheckpointError` naming the trial and the file."""
    import numpy as np
    import pandas as pd

    from raysearch.config import TrialConfig
    from raysearch.data.dataset import Task

    raw = _checkpoint_bytes(trial_id, checkpoint, "trial.json")
    try:
        config = TrialConfig.from_dict(json.loads(raw), path="trial.json")
    except (ValueError, UnicodeDecodeError, RaysearchError) as e:
        raise CheckpointError(
            f"trial {trial_id}: trial.json in {checkpoint} is corrupt ({first_line(e)[:200]})"
        ) from e
    task_uri = join(checkpoint, TASK_FILE)
    try:
        task = Task.from_dict(json.loads(read_bytes(task_uri)) if exists(task_uri) else None)
    except (ValueError, TypeError, RaysearchError) as e:
        raise CheckpointError(f"trial {trial_id}: {TASK_FILE} in {checkpoint} is corrupt ({e})") from e
    if not with_val:
        return TrialCheckpoint(trial_id, checkpoint, config, task)
    name = "val_predictions.parquet"
    raw = _checkpoint_bytes(trial_id, checkpoint, name)
    try:
        val = pd.read_parquet(io.BytesIO(raw))
    except Exception as e:  # pyarrow raises several unrelated types on garbage bytes
        raise CheckpointError(
            f"trial {trial_id}: {name} in {checkpoint} is corrupt ({first_line(e)[:200]})"
        ) from e
    needed = ["image_path", "study_id", "patient_id", *task.label_columns, *task.prob_columns]
    missing = [c for c in needed if c not in val.columns]
    if missing:
        raise CheckpointError(f"trial {trial_id}: {name} in {checkpoint} lacks {', '.join(missing)}")
    probs = val[list(task.prob_columns)].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    if not np.isfinite(probs).all() or ((probs < 0) | (probs > 1)).any():
        raise CheckpointError(
            f"trial {trial_id}: {name} in {checkpoint} has probabilities that are missing or "
            "outside [0, 1]"
        )
    if val["image_path"].duplicated().any():
        raise CheckpointError(f"trial {trial_id}: {name} in {checkpoint} lists images twice")
    return TrialCheckpoint(trial_id, checkpoint, config, task, val)


# ----------------------------------------------------------------------------- results


def read_trials(exp_dir: str):
    """``trials.parquet`` with ``trial_id`` as text and ``best_checkpoint`` resolved to a full URI
    (:func:`resolve`). Raises :class:`ExperimentStateError` when the search never wrote it."""
    from raysearch.storage import read_parquet

    uri = join(exp_dir, "trials.parquet")
    if not exists(uri):
        raise ExperimentStateError(
            f"{exp_dir} has no trials.parquet: its search has not finished (run its command "
            "again to resume it)"
        )
    trials = read_parquet(uri)
    missing = [c for c in ("trial_id", "best_val_loss", "best_checkpoint") if c not in trials]
    if missing:
        raise ExperimentStateError(f"{uri} lacks the columns {', '.join(missing)}")
    trials["trial_id"] = trials["trial_id"].astype(str)
    trials["best_checkpoint"] = [resolve(exp_dir, c) for c in trials["best_checkpoint"]]
    return trials


def read_manifest(exp_dir: str):
    """The experiment's ``manifest.parquet`` (beside ``experiment.json``, or where an older
    experiment.json says it is)."""
    from raysearch.storage import read_parquet

    uri = join(exp_dir, "manifest.parquet")
    if not exists(uri):
        try:
            saved = read_info(exp_dir).get("manifest")
        except ExperimentStateError:
            saved = None
        uri = resolve(exp_dir, saved) if saved else uri
    if not exists(uri):
        raise ExperimentStateError(f"experiment {exp_dir}: its manifest {uri} is missing")
    return read_parquet(uri)


TRIAL_COLUMNS = [
    "trial_id", "status", "epochs", "best_val_loss", "best_epoch", "val_study_kappa",
    "best_checkpoint", "wall_time_s", "error",
]
EPOCH_COLUMNS = [
    "trial_id", "epoch", "train_loss", "val_loss", "best_val_loss", "val_auc",
    "val_study_accuracy", "val_study_kappa", "lr", "epoch_time_s", "val_time_s",
    "train_images_per_s", "checkpoint_write_s", "reported_at", "node_id",
]


def run_dir(exp_dir: str, trial_id: str) -> str:
    """The Ray Train run folder of a trial: ``<experiment>/train-<trial_id>``."""
    return join(exp_dir, f"train-{trial_id}")


def trial_summary(
    exp_dir: str,
    trial_id: str,
    *,
    config: dict[str, Any],
    max_epochs: int,
    error: str | None = None,
    status: str | None = None,
    wall_time_s: float | None = None,
):
    """A trial's row of ``trials.parquet`` and its rows of ``epochs.parquet``, from its
    checkpoints (not from Tune's result files, which a restored trial rewrites; the latest
    checkpoint's ``history.json`` holds every epoch reported).

    The status is ``status`` if given (``unfinished``), else ``failed`` (an ``error``),
    ``completed`` (``max_epochs`` reached), ``early_stopped`` (its own patience), ``pruned``
    (stopped earlier by the scheduler) or ``pending`` (no epoch). ``best_checkpoint`` is relative
    to the experiment, so the experiment can be moved. ``config`` (the resolved trial config)
    fills the remaining columns.
    """
    import pandas as pd

    ckpts = run_checkpoints(run_dir(exp_dir, trial_id))
    history = latest_history(ckpts)
    frame = pd.DataFrame(history)
    frame["trial_id"] = trial_id
    keep = ["trial_id"] + [c for c in frame.columns if c != "trial_id"
                           and (c in EPOCH_COLUMNS or c.startswith(("val_kappa_", "val_auc_")))]
    row: dict[str, Any] = {"trial_id": trial_id, "error": error}
    stopped_early = False
    if ckpts:
        best_uri, best = min(ckpts, key=lambda c: c[1]["val_loss"])
        last = history[-1]
        wall = wall_time_s if wall_time_s is not None else sum(
            h["epoch_time_s"] + h["val_time_s"] for h in history)
        row.update(
            epochs=int(last["epoch"]), best_val_loss=float(best["val_loss"]),
            best_epoch=int(best["epoch"]), val_study_kappa=float(best["val_study_kappa"]),
            best_checkpoint=relative(exp_dir, best_uri), wall_time_s=float(wall),
        )
        stopped_early = bool(last.get("early_stopped", False))
    else:
        row.update(epochs=0, best_val_loss=float("nan"), best_epoch=0,
                   val_study_kappa=float("nan"), best_checkpoint=None, wall_time_s=float("nan"))
    if status is not None:
        row["status"] = status
    elif error:
        row["status"] = "failed"
    elif row["epochs"] >= max_epochs:
        row["status"] = "completed"
    elif stopped_early:
        row["status"] = "early_stopped"
    elif row["epochs"] > 0:
        row["status"] = "pruned"
    else:
        row["status"] = "pending"
    row.update({k: v for k, v in config.items() if k not in row})
    return row, frame[keep]


def results_tables(rows: list[dict[str, Any]], frames: list):
    """``trials.parquet`` (lowest best val_loss first) and ``epochs.parquet`` as DataFrames, from
    :func:`trial_summary`'s rows and epoch frames."""
    import pandas as pd

    trials = pd.DataFrame(rows) if rows else pd.DataFrame(columns=TRIAL_COLUMNS)
    cols = TRIAL_COLUMNS + [c for c in trials.columns if c not in TRIAL_COLUMNS]
    trials = trials[cols].sort_values("best_val_loss", na_position="last").reset_index(drop=True)
    epochs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return trials, epochs


def write_results(exp_dir: str, trials, epochs) -> None:
    """Write ``epochs.parquet`` and then ``trials.parquet`` (atomically each; trials last, as
    readers take its presence to mean the results are there)."""
    from raysearch.storage import atomic_write_parquet

    atomic_write_parquet(epochs, join(exp_dir, "epochs.parquet"))
    atomic_write_parquet(trials, join(exp_dir, "trials.parquet"))


# ----------------------------------------------------------------------------- finding experiments


def find_experiment(experiment: str | None, *, storage: str = "reports") -> str:
    """The experiment folder to ensemble: ``None`` -> the most recent one under ``storage``
    (newest ``experiment.json``); a bare name -> ``storage/name``; a path or URL as given."""
    if experiment is None:
        found = list_experiments(storage)
        if not found:
            raise ConfigError(
                f"no experiment under {storage} (no */experiment.json); run `raysearch tune` "
                "first or name one with --experiment"
            )
        return max(found, key=lambda item: (item[1], item[0]))[0]
    bare = not is_url(experiment) and "/" not in experiment and os.sep not in experiment
    candidates = [join(storage, experiment)] if bare else []
    candidates.append(experiment if is_url(experiment) else join(experiment))
    for path in candidates:
        if exists(join(path, "experiment.json")):
            return path
    known = [uri.rstrip("/").rsplit("/", 1)[-1] for uri, _ in list_experiments(storage)]
    listing = (
        f"experiments under {storage}: {name_some(sorted(known), limit=8)}"
        if known
        else f"there are none under {storage}"
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


# ----------------------------------------------------------------------------- one writer


_LEASE_S = float(os.environ.get("RAYSEARCH_LOCK_LEASE_S", "120"))


class ExperimentLock:
    """One writer per experiment: ``with ExperimentLock(exp_dir, command="tune"): ...``.

    The lock is the file ``<exp_dir>/.raysearch.lock``, holding who holds it (host, pid, user,
    command, start time). A second run refuses with :class:`ExperimentLockedError` naming them.

    * Local folders: an exclusive ``flock`` on that file. The kernel drops it the moment its
      holder dies, so a SIGKILLed run never leaves a stale lock.
    * Buckets and other fsspec stores: a lease. The holder creates the file only if it does not
      exist (GCS ``ifGenerationMatch=0``), and a background thread renews ``expires`` every
      lease/4 seconds (``RAYSEARCH_LOCK_LEASE_S``, default 120). A lock whose lease has expired
      belongs to a dead run and is taken over. On stores without conditional writes the holder
      reads the file back after writing it, and backs off if another run's token is there.
    """

    def __init__(self, exp_dir: str, *, command: str, lease_s: float | None = None) -> None:
        self.exp_dir = exp_dir
        self.uri = join(exp_dir, LOCK_NAME)
        self.command = command
        self.lease_s = float(lease_s if lease_s is not None else _LEASE_S)
        self.token = uuid.uuid4().hex
        self._file = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self._created_dir = False

    # --- what is written into the lock file
    def _holder(self) -> dict[str, Any]:
        now = time.time()
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": _user(),
            "command": self.command,
            "started": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "expires": now + self.lease_s,
            "token": self.token,
        }

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if is_url(self.exp_dir):
            self._acquire_remote()
        else:
            self._acquire_local()

    def release(self) -> None:
        if is_url(self.exp_dir):
            self._release_remote()
        else:
            self._release_local()

    # --- local: flock
    def _acquire_local(self) -> None:
        import fcntl

        folder = self.exp_dir
        self._created_dir = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        f = open(self.uri, "a+")  # noqa: SIM115 - kept open while the lock is held
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _parse_holder(f.read())
            f.close()
            raise ExperimentLockedError(_locked_message(self.exp_dir, holder)) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(self._holder()))
        f.flush()
        self._file = f

    def _release_local(self) -> None:
        import fcntl

        if self._file is None:
            return
        f, self._file = self._file, None
        with contextlib.suppress(OSError):
            os.unlink(self.uri)  # while still holding it: nobody can be waiting on this inode
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
        if self._created_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.exp_dir)  # only if the run left nothing in it

    # --- remote: a lease
    def _acquire_remote(self) -> None:
        fs, path = get_fs(self.uri)
        for _ in range(3):
            current = _read_remote_holder(fs, path)
            if current is not None:
                holder, generation = current
                if float(holder.get("expires", 0)) > time.time():
                    raise ExperimentLockedError(_locked_message(self.exp_dir, holder))
                _remove_remote(fs, path, generation)  # expired: its holder is dead
            if not _create_remote(fs, path, json.dumps(self._holder()).encode()):
                continue  # someone else created it first: look again
            time.sleep(0.2)  # stores without conditional writes: last writer wins; check it
            current = _read_remote_holder(fs, path)
            if current is None or current[0].get("token") != self.token:
                raise ExperimentLockedError(
                    _locked_message(self.exp_dir, current[0] if current else None)
                )
            self._thread = threading.Thread(
                target=self._renew, args=(fs, path), name="raysearch-lock", daemon=True
            )
            self._thread.start()
            return
        raise ExperimentLockedError(_locked_message(self.exp_dir, None))

    def _renew(self, fs, path: str) -> None:
        while not self._stop.wait(self.lease_s / 4):
            current = _read_remote_holder(fs, path)
            if current is None or current[0].get("token") != self.token:
                self.lost = True  # taken over: the lease ran out while this run was stalled
                return
            holder = {**current[0], "expires": time.time() + self.lease_s}
            # A missed renewal is retried at the next tick; the lease has slack for three.
            with contextlib.suppress(Exception):
                fs.pipe_file(path, json.dumps(holder).encode())

    def _release_remote(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        fs, path = get_fs(self.uri)
        current = _read_remote_holder(fs, path)
        if current is not None and current[0].get("token") == self.token:
            _remove_remote(fs, path, current[1])


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return str(os.getuid())


def _parse_holder(text: str) -> dict[str, Any] | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _locked_message(exp_dir: str, holder: dict[str, Any] | None) -> str:
    if not holder:
        return f"experiment {exp_dir} is in use by another raysearch run; wait for it to finish"
    who = (
        f"`raysearch {holder.get('command', '?')}` on host {holder.get('host', '?')}, "
        f"pid {holder.get('pid', '?')}, user {holder.get('user', '?')}, "
        f"since {holder.get('started', '?')}"
    )
    return f"experiment {exp_dir} is in use by {who}; wait for it to finish or stop it"


def _read_remote_holder(fs, path: str) -> tuple[dict[str, Any], Any] | None:
    try:
        info = fs.info(path)
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    holder = _parse_holder(raw.decode("utf-8", "replace")) or {}
    return holder, info.get("generation")


def _create_remote(fs, path: str, data: bytes) -> bool:
    """Create ``path`` only if it does not exist; False when another writer got there first."""
    parent = path.rsplit("/", 1)[0]
    with contextlib.suppress(Exception):
        fs.makedirs(parent, exist_ok=True)
    try:
        if type(fs).__module__.startswith("gcsfs"):
            fs.pipe_file(path, data, mode="create")  # ifGenerationMatch=0
        else:
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
    except FileExistsError:
        return False
    except OSError as e:  # gcsfs reports a failed precondition (HTTP 412) as an OSError
        if "412" in str(e) or "recondition" in str(e):
            return False
        raise
    return True


def _remove_remote(fs, path: str, generation: Any) -> None:
    """Delete ``path``, on GCS only if it is still the generation that was read."""
    try:
        if generation is not None and type(fs).__module__.startswith("gcsfs"):
            bucket, key, _ = fs.split_path(path)
            fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(generation))
            fs.invalidate_cache(path)
        else:
            fs.rm_file(path)
    except (FileNotFoundError, FileExistsError):
        pass  # gone already, or (gcsfs: HTTP 412) replaced by another run since it was read


# ----------------------------------------------------------------------------- trust


# Files Ray unpickles when a search is restored or its results are read back.
RAY_STATE_PATTERNS = (
    "tuner.pkl",
    "experiment_state-*.json",
    "searcher-state-*.pkl",
    "search_gen_state-*.json",
    "basic-variant-state-*.json",
    "callback-states-*.pkl",
    "*/error.pkl",
)
_KEEP_HASHES = 8  # per file: storage may still hold an older copy while a newer one uploads


def _trust_key() -> bytes:
    """The HMAC key: ``$RAYSEARCH_TRUST_KEY``, else ``~/.config/raysearch/trust.key`` (created
    with 32 random bytes and mode 0600 on first use). It never lives in the storage."""
    env = os.environ.get("RAYSEARCH_TRUST_KEY")
    if env:
        return env.encode()
    folder = os.path.join(os.path.expanduser("~"), ".config", "raysearch")
    path = os.path.join(folder, "trust.key")
    with contextlib.suppress(FileNotFoundError):
        with open(path, "rb") as f:
            key = f.read()
        if key:
            return key
    os.makedirs(folder, mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    try:
        os.link(tmp, path)  # first writer wins; a concurrent run reads the same key
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with open(path, "rb") as f:
        return f.read()


def _mac(files: dict[str, list[str]]) -> str:
    body = json.dumps(files, sort_keys=True).encode()
    return hmac.new(_trust_key(), body, hashlib.sha256).hexdigest()


def _state_files(root: str) -> dict[str, str]:
    """Relative name -> full path of every Ray state file under ``root`` (one level of trial
    folders deep)."""
    fs, path = get_fs(root)
    if not fs.exists(path):
        return {}
    base = path.rstrip("/")
    out = {}
    for found in fs.find(base, maxdepth=2, withdirs=False):
        found = found if found.startswith(base) else fs._strip_protocol(found)
        rel = found[len(base) + 1 :]
        if any(fnmatch.fnmatchcase(rel, p) for p in RAY_STATE_PATTERNS):
            out[rel] = join(root, rel)
    return out


def _read_trust(exp_dir: str) -> dict[str, list[str]]:
    """The signed hashes of ``exp_dir`` ({} when missing, or not signed with this machine's key)."""
    try:
        record = json.loads(read_bytes(join(exp_dir, TRUST_NAME)))
        files = record["files"]
        if hmac.compare_digest(str(record["mac"]), _mac(files)):
            return {str(k): [str(h) for h in v] for k, v in files.items()}
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass
    return {}


def _sha256(uri: str) -> str:
    return hashlib.sha256(read_bytes(uri)).hexdigest()


def sign_ray_state(exp_dir: str, *, source: str | None = None) -> int:
    """Sign the SHA-256 of every Ray state file in ``source`` (default ``exp_dir``; during a run,
    Ray's local staging folder, which it then copies to ``exp_dir``) into ``exp_dir``'s trust file.

    Earlier hashes of the same file are kept (up to 8), so a storage copy that is a save or two
    behind still verifies. Returns the number of files signed.
    """
    files = _read_trust(exp_dir)
    found = _state_files(source or exp_dir)
    changed = False
    for rel, uri in found.items():
        try:
            digest = _sha256(uri)
        except FileNotFoundError:
            continue  # replaced while we looked; the next save signs the new one
        known = files.setdefault(rel, [])
        if digest not in known:
            known.append(digest)
            del known[:-_KEEP_HASHES]
            changed = True
    if changed or not exists(join(exp_dir, TRUST_NAME)):
        record = {"files": files, "mac": _mac(files)}
        atomic_write_text(join(exp_dir, TRUST_NAME), json.dumps(record, indent=1))
    return len(found)


def verify_ray_state(exp_dir: str) -> None:
    """Refuse (:class:`ExperimentStateError`) to let Ray unpickle any state file in ``exp_dir``
    that raysearch did not sign on this machine (see the module docstring)."""
    signed = _read_trust(exp_dir)
    bad = []
    for rel, uri in sorted(_state_files(exp_dir).items()):
        if _sha256(uri) not in signed.get(rel, ()):
            bad.append(rel)
    if bad:
        why = (
            "it has no raysearch-trust.json signed with this machine's key"
            if not signed
            else "their contents differ from what raysearch wrote"
        )
        raise ExperimentStateError(
            f"refusing to resume {exp_dir}: Ray would unpickle {name_some(bad)}, and {why}. "
            "Unpickling runs code: resume only a folder you trust, with --trust-experiment "
            "(an experiment from another machine, or written by raysearch < 0.2)"
        )


def check_ray_state_intact(exp_dir: str) -> None:
    """Refuse (:class:`ExperimentStateError`) a saved search whose Ray state is damaged: an empty
    file, a pickle that ends early, an experiment state that is not complete JSON (a full disk
    leaves such files). Nothing is unpickled: pickles are only walked opcode by opcode."""
    damaged = []
    for rel, uri in sorted(_state_files(exp_dir).items()):
        raw = read_bytes(uri)
        reason = _damage(rel, raw)
        if reason:
            damaged.append(f"{rel} ({reason})")
    if not damaged:
        return
    states = sorted(r for r in _state_files(exp_dir) if r.startswith("experiment_state-"))
    hint = "run with --overwrite to start the search over"
    if len(states) > 1 and any(d.startswith(states[-1]) for d in damaged):
        hint += f", or delete {states[-1]} to resume from the state saved before it ({states[-2]})"
    raise ExperimentStateError(
        f"the saved search state in {exp_dir} is damaged: {name_some(damaged)}; it cannot be "
        f"resumed as it was, and raysearch will not start a smaller search in its place: {hint}"
    )


def _damage(rel: str, raw: bytes) -> str | None:
    if not raw:
        return "empty"
    if rel.endswith(".pkl") or rel.startswith(("search_gen_state-", "basic-variant-state-")):
        if rel.startswith("basic-variant-state-"):
            return None
        try:
            for _ in pickletools.genops(io.BytesIO(raw)):
                pass
        except Exception as e:  # noqa: BLE001 - any parse failure means a damaged pickle
            return f"truncated or not a pickle: {str(e)[:60]}"
        return None
    try:
        json.loads(raw)
    except ValueError:
        return "incomplete JSON"
    return None


def unfinished_trials(exp_dir: str) -> set[str]:
    """Ids of the trials that Ray's newest saved experiment state records as not ended (PENDING,
    RUNNING or PAUSED): what a resume would continue. Read as plain JSON, nothing unpickled."""
    states = sorted(r for r in _state_files(exp_dir) if r.startswith("experiment_state-"))
    if not states:
        return set()
    try:
        state = json.loads(read_bytes(join(exp_dir, states[-1])))
        out = set()
        for trial_json, _ in state["trial_data"]:
            trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
            if trial.get("status") in ("PENDING", "RUNNING", "PAUSED"):
                out.add(str(trial["trial_id"]))
        return out
    except (ValueError, KeyError, TypeError):
        return set()


@contextlib.contextmanager
def fail_on_restore_error() -> Iterator[None]:
    """While active, Ray Tune's "Failed to restore the run state" (after which Ray would start a
    new, empty search in the restored one's place) raises :class:`ExperimentStateError` instead."""
    import logging

    class _Tripwire(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Failed to restore the run state"):
                cause = record.exc_info[1] if record.exc_info else None
                raise ExperimentStateError(
                    "Ray could not restore the saved search state"
                    + (f" ({cause})" if cause else "")
                    + "; raysearch will not start a smaller search in its place: run with "
                    "--overwrite to start over"
                ) from cause

    logger = logging.getLogger("ray.tune.execution.tune_controller")
    handler = _Tripwire(level=logging.ERROR)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def raysearch_error_in(error: BaseException) -> RaysearchError | None:
    """The first :class:`RaysearchError` in ``error``'s cause/context chain, if any."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RaysearchError):
            return e
        e = e.__cause__ or e.__context__
    return None
