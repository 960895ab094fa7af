"""Tune stage, the results: what a search's trials left, read back as tables, and the live view.

``collect_results`` turns a finished (or resumed) search into one row per trial and one per epoch,
from the checkpoints each trial wrote rather than from Tune's result files, which a restored trial
rewrites. ``SearchProgress`` is the Tune callback behind the live Rich view on the driver.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from raysearch.experiment import checkpoint_damage, relative, sign_ray_state
from raysearch.space import SearchSpace
from raysearch.storage import get_fs, join, read_bytes

__all__ = ["EPOCH_COLUMNS", "TRIAL_COLUMNS", "SearchProgress", "TrustCallback",
           "collect_results", "latest_history", "run_checkpoints"]


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


def _callback_base():
    from ray.tune import Callback

    return Callback


class TrustCallback(_callback_base()):
    """Signs Ray's state files right after Ray saves them (see ``raysearch.experiment``).

    Tune saves its experiment state into a local staging folder at the end of a controller step
    and then copies it to storage; ``on_step_end`` runs right after that save, so each new state
    is signed before the driver could be killed with it in storage. Only the experiment URI
    travels when Ray pickles this callback.
    """

    def __init__(self, experiment_dir: str) -> None:
        self.experiment_dir = experiment_dir
        self._seen: tuple = ()

    def __getstate__(self):
        return {"experiment_dir": self.experiment_dir, "_seen": ()}

    def on_step_end(self, iteration, trials, **info):
        if not trials:
            return
        import os

        staging = trials[0].storage.experiment_driver_staging_path
        try:
            stamp = tuple(
                sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(staging) if e.is_file())
            )
        except OSError:
            return
        if stamp != self._seen:
            sign_ray_state(self.experiment_dir, source=staging)
            self._seen = stamp


# ----------------------------------------------------------------------------- live view


def _progress_base():
    from ray.tune import Callback

    return Callback


class SearchProgress(_progress_base()):
    """A Tune callback that keeps a live Rich view on the driver: a progress bar over the epochs
    budget and a table of trials (id, status, epoch, val_loss, best, kappa, key config values)."""

    def __init__(self, spec: SearchSpace, *, console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.spec = spec
        self.console = console
        self.rows: dict[str, dict[str, Any]] = {}
        self.progress = Progress(
            TextColumn("trials done"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task("trials", total=spec.search.num_samples)
        self.live = None

    # Ray pickles the run config (with its callbacks) into the experiment state; the console and
    # the live display hold locks and cannot travel. A restored copy renders nothing.
    def __getstate__(self):
        return {"spec": self.spec, "rows": {}, "console": None, "progress": None, "task": None,
                "live": None}

    def __enter__(self):
        from rich.live import Live

        self.live = Live(self._render(), console=self.console, refresh_per_second=2,
                         transient=not self.console.is_terminal)
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(*exc)
            self.live = None

    def _render(self):
        from rich.console import Group

        from raysearch.report import trials_table

        rows = sorted(self.rows.values(), key=lambda r: r["trial_id"])
        return Group(self.progress, trials_table(rows[-30:]))

    def _row(self, trial) -> dict[str, Any]:
        row = self.rows.setdefault(trial.trial_id, {"trial_id": trial.trial_id})
        row.update({k: v for k, v in (trial.config or {}).items() if not k.startswith("_")})
        return row

    def _refresh(self) -> None:
        if self.progress is None:
            return
        done = sum(r["status"] in ("done", "failed", "stopped") for r in self.rows.values())
        self.progress.update(self.task, completed=done)
        if self.live is not None:
            self.live.update(self._render())

    def on_trial_start(self, iteration, trials, trial, **info):
        self._row(trial)["status"] = "running"
        self._refresh()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("resume_note") and self.console is not None:
            self.console.print(f"[yellow]trial {trial.trial_id}: {result['resume_note']}[/]")
        row = self._row(trial)
        row.update(status="running", epoch=result.get("epoch"), val_loss=result.get("val_loss"),
                   best_val_loss=result.get("best_val_loss"),
                   val_study_kappa=result.get("val_study_kappa"))
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row["status"] = "done" if (row.get("epoch") or 0) >= self.spec.scheduler.max_epochs else "stopped"
        self._log(row)
        self._refresh()

    def on_trial_error(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row["status"] = "failed"
        self._log(row)
        self._refresh()

    def _log(self, row: dict[str, Any]) -> None:
        """Without a terminal (CI, `ray job submit` logs) the live view is not drawn: one line
        per finished trial instead."""
        if self.console is None or self.console.is_terminal:
            return
        from raysearch.report import fmt

        self.console.print(
            f"trial {row['trial_id']} {row['status']} after {row.get('epoch') or 0} epochs: "
            f"best val_loss {fmt(row.get('best_val_loss'))}, val study kappa "
            f"{fmt(row.get('val_study_kappa'))} ({row.get('arch', '')}, {row.get('image_size', '')} px)"
        )
