"""The experiment's trials: their checkpoints (intact or not), a checkpoint read back, and the
result tables (``trials.parquet``, ``epochs.parquet``) built from them."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

from raysearch.errors import (
    CheckpointError,
    ExperimentStateError,
    RaysearchError,
    first_line,
)
from raysearch.experiment.folder import read_info, relative, resolve
from raysearch.storage import (
    exists,
    get_fs,
    join,
    read_bytes,
)

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
        config = TrialConfig.from_saved(json.loads(raw), path="trial.json")
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


# The one vocabulary of trial status words. trials.parquet, the live view and its end-of-trial
# lines, and every table use these and no others; the first two only while a trial runs.
TRIAL_STATUSES = ("pending", "running", "completed", "early_stopped", "pruned", "failed",
                  "unfinished")


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
        # Several labels: each label's val AUC at the best epoch (val_auc_<label>).
        row.update({k: float(v) for k, v in best.items() if k.startswith("val_auc_")})
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
    assert row["status"] in TRIAL_STATUSES, row["status"]
    row.update({k: v for k, v in config.items() if k not in row})
    return row, frame[keep]


def results_tables(rows: list[dict[str, Any]], frames: list):
    """``trials.parquet`` (lowest best val_loss first, ties by trial id) and ``epochs.parquet``
    (in reporting order: ``reported_at``, then trial id and epoch) as DataFrames, from
    :func:`trial_summary`'s rows and epoch frames. Both orders depend on the results alone, not
    on the order Tune lists its trials in (which a restored search changes), so a search read
    back writes the same files."""
    import pandas as pd

    trials = pd.DataFrame(rows) if rows else pd.DataFrame(columns=TRIAL_COLUMNS)
    cols = TRIAL_COLUMNS + [c for c in trials.columns if c not in TRIAL_COLUMNS]
    trials = (trials[cols].sort_values(["best_val_loss", "trial_id"], na_position="last",
                                       kind="stable").reset_index(drop=True))
    epochs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    order = [c for c in ("reported_at", "trial_id", "epoch") if c in epochs.columns]
    if order:
        epochs = epochs.sort_values(order, na_position="last", kind="stable").reset_index(drop=True)
    return trials, epochs


def write_results(exp_dir: str, trials, epochs) -> None:
    """Write ``epochs.parquet`` and then ``trials.parquet`` (atomically each; trials last, as
    readers take its presence to mean the results are there), each column with the Arrow type
    :mod:`raysearch.experiment.schema` gives it."""
    from raysearch.experiment.schema import EPOCHS, TRIALS, write_parquet

    write_parquet(epochs, join(exp_dir, "epochs.parquet"), EPOCHS)
    write_parquet(trials, join(exp_dir, "trials.parquet"), TRIALS)
