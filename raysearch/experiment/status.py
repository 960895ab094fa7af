"""An experiment seen without running it: its state (finished, interrupted, running), its trials
by status, the best so far, and the epochs and device-hours spent. Reads files only: no Ray.

The state comes from ``experiment.json`` and the lock together. A run marks the experiment
``running`` when it starts and ``finished``/``interrupted``/``failed`` when it ends; a run that
died (SIGKILL, a lost machine) never writes the end, so ``running`` with nobody holding
``.raysearch.lock`` is reported as ``interrupted``.

Trials come from ``trials.parquet`` once the run has written it; while a search is running (or
after it died) they come from each trial's checkpoints (``train-<id>/checkpoint_*``), the same
files a resume reads, with status ``running`` (the run is alive) or ``unfinished``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from raysearch.errors import ConfigError, ExperimentStateError
from raysearch.experiment.folder import list_experiments, read_info
from raysearch.experiment.lock import lock_holder
from raysearch.experiment.trials import (
    EPOCH_COLUMNS,
    TRIAL_COLUMNS,
    latest_history,
    read_trials,
    run_checkpoints,
)
from raysearch.storage import exists, get_fs, join, read_bytes, read_parquet

__all__ = ["ExperimentStatus", "experiment_state", "experiment_status", "list_status",
           "trials_and_epochs"]

# The order statuses are shown in: the ones that ended first, then the ones still going.
STATUS_ORDER = ("completed", "early_stopped", "pruned", "failed", "running", "unfinished",
                "pending")


@dataclass
class ExperimentStatus:
    """What ``raysearch status`` shows. ``device_hours`` is GPU-hours when ``device == "GPU"``,
    else CPU-hours (core-hours): the time of every epoch (train + val) times the devices a trial
    held (workers x GPUs, or workers x CPUs, per worker)."""

    path: str
    name: str
    kind: str
    state: str  # finished | interrupted | running | failed | no_space | unknown
    trials: int
    num_samples: int | None
    by_status: dict[str, int]
    epochs: int
    device: str  # "GPU" or "CPU"
    device_hours: float
    best: dict[str, Any] | None  # the best trial's row (trial_id, best_val_loss, arch, ...)
    updated: str | None = None
    holder: dict[str, Any] | None = None  # who holds the lock, when the experiment is running
    ensemble: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # `raysearch refit`: configurations, folds, runs, epochs, device_hours, best (trial_id,
    # cv_val_loss_mean, cv_val_loss_sd); None without a refit
    refit: dict[str, Any] | None = None
    selection: str | None = None  # the ensemble's selection set: val or oof

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python values (``json.dumps`` takes it as it is)."""
        return asdict(self)


def experiment_state(exp_dir: str, info: dict[str, Any] | None = None) -> tuple[str, dict | None]:
    """(state, lock holder). ``running`` only while a run holds the lock; a ``running`` mark left
    by a run that died is ``interrupted``."""
    info = read_info(exp_dir) if info is None else info
    holder = lock_holder(exp_dir)
    state = str(info.get("state") or "unknown")
    if holder is not None:
        return "running", holder
    if state == "running":
        return "interrupted", None
    return state, None


def trials_and_epochs(exp_dir: str, *, running: bool = False):
    """``(trials, epochs)`` DataFrames: the saved ``trials.parquet``/``epochs.parquet`` when the
    run wrote them and is not running, else read from the trials' checkpoints."""
    import pandas as pd

    if not running and exists(join(exp_dir, "trials.parquet")):
        trials = read_trials(exp_dir)
        uri = join(exp_dir, "epochs.parquet")
        epochs = read_parquet(uri) if exists(uri) else pd.DataFrame(columns=EPOCH_COLUMNS)
        return trials, epochs
    return _from_checkpoints(exp_dir, status="running" if running else "unfinished")


def _max_epochs(exp_dir: str) -> int | None:
    """``scheduler.max_epochs`` of the saved search space (None when unknown)."""
    import yaml

    uri = join(exp_dir, "search_space.yaml")
    try:
        saved = yaml.safe_load(read_bytes(uri)) if exists(uri) else None
        value = ((saved or {}).get("scheduler") or {}).get("max_epochs")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    return int(value) if isinstance(value, int) else None


def _from_checkpoints(exp_dir: str, *, status: str):
    """Trials and epochs from each ``train-<id>/`` folder: a trial at ``max_epochs`` (or stopped
    on its patience) is ``completed`` (``early_stopped``); any other is ``status`` (running or
    unfinished), or ``pending`` when it never reported an epoch and the run is not alive."""
    import pandas as pd

    max_epochs = _max_epochs(exp_dir)
    fs, path = get_fs(exp_dir)
    rows, frames = [], []
    names = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)) \
        if fs.exists(path) else []
    for name in names:
        if not name.startswith("train-"):
            continue
        trial_id = name.removeprefix("train-")
        ckpts = run_checkpoints(join(exp_dir, name))
        try:
            history = latest_history(ckpts)
        except (OSError, ValueError):
            history = []
        last = history[-1] if history else {}
        row = {"trial_id": trial_id, "status": status, "epochs": int(last.get("epoch", 0))}
        if max_epochs and row["epochs"] >= max_epochs:
            row["status"] = "completed"
        elif last.get("early_stopped"):
            row["status"] = "early_stopped"
        elif not history and status != "running":
            row["status"] = "pending"  # never reported an epoch
        if ckpts:
            best_uri, best = min(ckpts, key=lambda c: c[1]["val_loss"])
            row.update(best_val_loss=float(best["val_loss"]), best_epoch=int(best["epoch"]),
                       val_study_kappa=float(best.get("val_study_kappa", float("nan"))),
                       best_checkpoint=best_uri)
        rows.append(row)
        if history:
            frames.append(pd.DataFrame(history).assign(trial_id=trial_id))
    trials = pd.DataFrame(rows)
    for col in TRIAL_COLUMNS:
        if col not in trials:
            trials[col] = None
    if "best_val_loss" in trials and len(trials):
        trials = trials.sort_values("best_val_loss", na_position="last").reset_index(drop=True)
    epochs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=EPOCH_COLUMNS)
    return trials, epochs


def _device_hours(info: dict[str, Any], epochs) -> tuple[str, float]:
    """("GPU" | "CPU", hours): epoch seconds (train + val) x devices per trial / 3600."""
    res = info.get("resources") or {}
    workers = float(res.get("workers") or 1)
    gpus = float(res.get("gpus_per_worker") or 0)
    cpus = float(res.get("cpus_per_worker") or 1)
    seconds = 0.0
    for col in ("epoch_time_s", "val_time_s"):
        if len(epochs) and col in epochs:
            seconds += float(epochs[col].fillna(0).sum())
    if gpus > 0:
        return "GPU", seconds * workers * gpus / 3600
    return "CPU", seconds * workers * cpus / 3600


def experiment_status(exp_dir: str) -> ExperimentStatus:
    """The status of the experiment at ``exp_dir`` (a folder or URL). Raises
    :class:`ExperimentStateError` when it is not a raysearch experiment."""
    info = read_info(exp_dir)
    state, holder = experiment_state(exp_dir, info)
    trials, epochs = trials_and_epochs(exp_dir, running=state == "running")
    counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    by_status = {s: int(counts.pop(s)) for s in STATUS_ORDER if s in counts}
    by_status.update({str(s): int(n) for s, n in counts.items()})
    best = None
    usable = trials[trials["best_val_loss"].notna()] if len(trials) else trials
    if len(usable):
        row = usable.sort_values("best_val_loss", kind="stable").iloc[0]
        best = {k: _plain(v) for k, v in row.items() if _is_set(v)}
    device, hours = _device_hours(info, epochs)
    refit = _refit_summary(exp_dir, info)
    selection = None
    if exists(join(exp_dir, "ensemble", "ensemble.json")):
        import json

        try:
            selection = json.loads(read_bytes(join(exp_dir, "ensemble", "ensemble.json"))).get(
                "selection", "val")
        except (OSError, ValueError):
            selection = None
    return ExperimentStatus(
        path=exp_dir, name=str(info.get("name") or exp_dir.rstrip("/").rsplit("/", 1)[-1]),
        kind=str(info.get("kind", "search")), state=state, trials=len(trials),
        num_samples=info.get("num_samples"), by_status=by_status,
        epochs=len(epochs), device=device, device_hours=hours, best=best,
        updated=info.get("updated"), holder=holder,
        ensemble=exists(join(exp_dir, "ensemble", "members.parquet")),
        refit=refit, selection=selection,
    )


def _refit_summary(exp_dir: str, info: dict[str, Any]) -> dict[str, Any] | None:
    """What ``raysearch refit`` wrote (refit/refits.parquet): counts, compute, the best
    configuration by cross-validated val loss; None without one."""
    uri = join(exp_dir, "refit", "refits.parquet")
    if not exists(uri):
        return None
    refits = read_parquet(uri)
    if refits.empty:
        return None
    device, hours = _device_hours(info, refits.rename(columns={"seconds": "epoch_time_s"}))
    cv = refits.groupby("trial_id")["val_loss"].agg(["mean", "std"]).sort_values("mean")
    return {"configurations": int(refits["trial_id"].nunique()),
            "folds": int(refits["fold"].nunique()), "runs": len(refits),
            "epochs": int(refits["epochs"].sum()), "device": device, "device_hours": hours,
            "best": {"trial_id": str(cv.index[0]), "cv_val_loss_mean": float(cv["mean"].iloc[0]),
                     "cv_val_loss_sd": float(cv["std"].iloc[0])}}


def _plain(v: Any) -> Any:
    """A DataFrame cell as a plain Python value, so that a status is JSON-able: numpy scalars
    become int/float/bool/str, timestamps ISO 8601 strings (UTC when they carry a zone)."""
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def _is_set(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _minutes(stamp: str | None) -> str | None:
    """``stamp`` (ISO 8601, as ``experiment.json``'s ``updated``) as ``YYYY-MM-DD HH:MM`` UTC, the
    time ``status`` shows; None when absent or unreadable (the caller falls back to the file's
    modification time, which a copy or a download resets)."""
    if not stamp:
        return None
    try:
        when = datetime.fromisoformat(str(stamp))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")


def list_status(storage: str):
    """One row per experiment under ``storage`` (newest first): name, kind, state, trials, best
    val_loss, updated (UTC: the time ``status`` shows, from ``experiment.json``, not the file's
    modification time, which a copy resets). Damaged experiments are listed with state
    ``damaged``.

    Raises :class:`ConfigError` when ``storage`` is a local path that is not a folder (a bucket
    prefix with nothing under it is simply empty)."""
    from raysearch.storage import is_url

    if not is_url(storage):  # a bucket prefix may be empty; a mistyped local folder is an error
        local = os.path.expanduser(str(storage).removeprefix("file://"))
        if not os.path.isdir(local):
            what = "is not a folder" if os.path.exists(local) else "does not exist"
            raise ConfigError(f"storage folder {storage} {what}")
    import pandas as pd

    rows = []
    for exp_dir, mtime in list_experiments(storage):
        name = exp_dir.rstrip("/").rsplit("/", 1)[-1]
        when = datetime.fromtimestamp(mtime, timezone.utc).strftime("%Y-%m-%d %H:%M")
        try:
            st = experiment_status(exp_dir)
        except (ExperimentStateError, OSError, ValueError, KeyError) as e:
            rows.append({"name": name, "kind": None, "state": "damaged", "trials": 0,
                         "best_val_loss": None, "updated": when, "note": str(e)[:80]})
            continue
        rows.append({"name": name, "kind": st.kind, "state": st.state, "trials": st.trials,
                     "best_val_loss": (st.best or {}).get("best_val_loss"),
                     "updated": _minutes(st.updated) or when,
                     "note": "ensemble" if st.ensemble else ""})
    cols = ["name", "kind", "state", "trials", "best_val_loss", "updated", "note"]
    return pd.DataFrame(rows, columns=cols).sort_values("updated", ascending=False,
                                                        kind="stable").reset_index(drop=True)
