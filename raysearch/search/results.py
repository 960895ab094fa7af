"""Tune stage, the results: what a search's trials left, read back as tables, and the live view.

``collect_results`` turns a finished (or resumed) search into one row per trial and one per epoch,
from the checkpoints each trial wrote rather than from Tune's result files, which a restored trial
rewrites. ``SearchProgress`` is the Tune callback behind the live Rich view on the driver.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from raysearch.experiment import latest_history, relative, run_checkpoints
from raysearch.search.space import SearchSpace
from raysearch.storage import join

__all__ = ["EPOCH_COLUMNS", "TRIAL_COLUMNS", "collect_results"]


# ----------------------------------------------------------------------------- results


TRIAL_COLUMNS = [
    "trial_id", "status", "epochs", "best_val_loss", "best_epoch", "val_study_kappa",
    "best_checkpoint", "wall_time_s", "error",
]
EPOCH_COLUMNS = [
    "trial_id", "epoch", "train_loss", "val_loss", "best_val_loss", "val_auc",
    "val_study_accuracy", "val_study_kappa", "lr", "epoch_time_s", "val_time_s",
    "train_images_per_s", "checkpoint_write_s", "reported_at", "node_id",
]


def collect_results(
    grid, spec: SearchSpace, *, unfinished: set[str] = frozenset()
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per trial and one per epoch.

    Epochs come from the ``history.json`` each trial carries in its latest checkpoint, not from
    Tune's result files: a trial that finished just before the driver was killed is restored,
    re-reports its last epoch and rewrites Tune's files, but its checkpoints keep every epoch.
    ``best_checkpoint`` is relative to the experiment folder (``train-<id>/checkpoint_<n>``), so
    the experiment can be moved. A trial that Tune had not ended when the search stopped
    (Ctrl-C) is ``unfinished``: ``unfinished`` holds their ids, as Ray's saved state records them
    (Ray marks the trials it stopped on Ctrl-C TERMINATED in memory, RUNNING in the saved state).
    """

    trial_rows, epoch_frames = [], []
    names = [p.name for p in spec.space]
    # ResultGrid keeps its results in the order of the analysis' Trial objects, which carry ids.
    for trial, result in zip(grid._experiment_analysis.trials, grid):
        config = result.config or {}
        trial_id = str(trial.trial_id)
        ckpts = run_checkpoints(join(spec.experiment_dir, f"train-{trial_id}"))
        history = latest_history(ckpts)
        df = pd.DataFrame(history)
        df["trial_id"] = trial_id
        keep = ["trial_id"] + [
            c for c in df.columns
            if c != "trial_id" and (c in EPOCH_COLUMNS or c.startswith("val_kappa_"))
        ]
        epoch_frames.append(df[keep])
        full = spec.trial_config({k: config[k] for k in names if k in config}).to_dict()
        row: dict[str, Any] = {"trial_id": trial_id}
        row["error"] = _error_line(result.error)
        if ckpts:
            best_uri, best = min(ckpts, key=lambda c: c[1]["val_loss"])
            last = history[-1]
            wall = (result.metrics or {}).get("time_total_s")
            if wall is None:
                wall = sum(h["epoch_time_s"] + h["val_time_s"] for h in history)
            row.update(
                epochs=int(last["epoch"]),
                best_val_loss=float(best["val_loss"]),
                best_epoch=int(best["epoch"]),
                val_study_kappa=float(best["val_study_kappa"]),
                best_checkpoint=relative(spec.experiment_dir, best_uri),
                wall_time_s=float(wall),
            )
            stopped_early = bool(last.get("early_stopped", False))
        else:
            row.update(epochs=0, best_val_loss=float("nan"), best_epoch=0,
                       val_study_kappa=float("nan"), best_checkpoint=None,
                       wall_time_s=float("nan"))
            stopped_early = False
        if result.error:
            row["status"] = "failed"
        elif trial_id in unfinished or trial.status in ("PENDING", "RUNNING", "PAUSED"):
            row["status"] = "unfinished"  # the search stopped before this trial ended
        elif row["epochs"] >= spec.scheduler.max_epochs:
            row["status"] = "completed"
        elif stopped_early:
            row["status"] = "early_stopped"
        elif row["epochs"] > 0:
            row["status"] = "pruned"  # stopped by ASHA
        else:
            row["status"] = "pending"
        row.update({k: v for k, v in full.items() if k not in row})
        trial_rows.append(row)
    trials = pd.DataFrame(trial_rows)
    if trials.empty:
        trials = pd.DataFrame(columns=TRIAL_COLUMNS)
    cols = TRIAL_COLUMNS + [c for c in trials.columns if c not in TRIAL_COLUMNS]
    trials = trials[cols].sort_values("best_val_loss", na_position="last").reset_index(drop=True)
    epochs = pd.concat(epoch_frames, ignore_index=True) if epoch_frames else pd.DataFrame()
    return trials, epochs


def _error_line(error: BaseException | None) -> str | None:
    """The last non-empty line of a trial's error (Ray puts the root cause last), at most 500
    characters; None for no error."""
    if not error:
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


# ----------------------------------------------------------------------------- trust


# ----------------------------------------------------------------------------- live view


