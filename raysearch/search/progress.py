"""Search stage, the driver's Tune callbacks: the live Rich view of the search
(:class:`SearchProgress`) and the signing of Ray's state as Ray saves it (:class:`TrustCallback`).
"""

from __future__ import annotations

from typing import Any

from raysearch.experiment import sign_ray_state
from raysearch.search.space import SearchSpace

__all__ = ["SearchProgress", "TrustCallback"]


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

        from raysearch.report.tables import trials_table

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
        from raysearch.report.tables import fmt

        self.console.print(
            f"trial {row['trial_id']} {row['status']} after {row.get('epoch') or 0} epochs: "
            f"best val_loss {fmt(row.get('best_val_loss'))}, val study kappa "
            f"{fmt(row.get('val_study_kappa'))} ({row.get('arch', '')}, {row.get('image_size', '')} px)"
        )
