"""Report stage, the live view of running trials: a bar over the epoch budget with an ETA, and a
table of trials that fits the terminal. Ray-free: ``raysearch tune`` feeds it from a Tune
callback (``raysearch.search.progress``), ``raysearch train`` from its Train run.

What the view says about a trial that has ended comes from that trial's recorded row (the row
``trials.parquet`` gets, see :func:`raysearch.experiment.trial_summary`), never from whichever
result reached the driver last: Ray may deliver a trial's last result after its end, and a
pruned trial's driver may die between a report and its delivery.
"""

from __future__ import annotations

import math
from typing import Any

from raysearch.experiment import TRIAL_STATUSES
from raysearch.report.tables import KEY_PARAMS, fmt, trials_table

__all__ = ["LiveView", "end_line", "say_stage"]

ENDED = ("completed", "early_stopped", "pruned", "failed", "unfinished")
assert set(ENDED) < set(TRIAL_STATUSES)


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def say_stage(console, text: str) -> None:
    """One line, at once, for what the driver does before the live view starts ('starting
    Ray', 'preparing data'): a search is never a blank screen for a minute."""
    if console is not None:
        console.print(f"[dim]{text} ...[/]")


def end_line(row: dict[str, Any]) -> str:
    """The one line said when a trial ends, from its recorded row (a ``trials.parquet`` row):
    'trial 3f2a_00001 pruned after 4/8 epochs: best val_loss 0.612 at epoch 3, val study kappa
    0.281 (resnet18, 64 px)'. The kappa is the one at the best epoch, as the row has it."""
    epochs = int(row.get("epochs") or 0)
    top = row.get("max_epochs")
    ran = f"{epochs}/{int(top)}" if top else str(epochs)
    best = _number(row.get("best_val_loss"))
    line = f"trial {row['trial_id']} {row['status']} after {ran} epochs"
    if best is not None:
        line += (f": best val_loss {fmt(best)} at epoch {int(row.get('best_epoch') or 0)}, "
                 f"val study kappa {fmt(_number(row.get('val_study_kappa')))}")
    about = ", ".join(s for s in (str(row.get("arch") or ""),
                                  f"{row['image_size']} px" if row.get("image_size") else "") if s)
    if about:
        line += f" ({about})"
    if row.get("status") == "failed" and row.get("error"):
        line += f"; {row['error']}"
    return line


class LiveView:
    """The live view of a search (or one trial): a bar over the epochs planned, with an ETA, and
    the trials table (:func:`raysearch.report.tables.trials_table`, fitted to the console's width).

    The budget is ``num_trials * max_epochs`` and shrinks as trials end early (a pruned trial
    counts the epochs it ran). Feed it with :meth:`stage` (what the driver is doing before any
    epoch), :meth:`add` (pending), :meth:`start`, :meth:`result` (a reported epoch) and :meth:`end` (the trial's recorded
    row). Without a terminal nothing is drawn live; each ended trial gets one line instead
    (:func:`end_line`), and a stage gets one line.
    """

    def __init__(self, *, num_trials: int, max_epochs: int, console,
                 params: tuple[str, ...] = KEY_PARAMS, shown: int = 30) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.num_trials, self.max_epochs = int(num_trials), int(max_epochs)
        self.console, self.params, self.shown = console, params, shown
        self.rows: dict[str, dict[str, Any]] = {}
        self._seen: dict[str, dict[int, tuple[float | None, float | None]]] = {}
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("epochs"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task("starting", total=self.budget())
        self.live = None

    # ------------------------------------------------------------------ the figures

    def budget(self) -> int:
        """Epochs planned: what ended trials ran, plus ``max_epochs`` for every other trial."""
        ended = [r for r in self.rows.values() if r.get("status") in ENDED]
        return sum(int(r.get("epochs") or 0) for r in ended) + self.max_epochs * max(
            0, self.num_trials - len(ended))

    def epochs_done(self) -> int:
        """Epochs run so far: an ended trial's recorded count, a running trial's latest epoch."""
        return sum(int((r.get("epochs") if r.get("status") in ENDED else r.get("epoch")) or 0)
                   for r in self.rows.values())

    # ------------------------------------------------------------------ events

    def stage(self, text: str) -> None:
        """What the driver is doing now ('starting Ray', 'preparing data'): shown at once."""
        self.progress.update(self.task, description=text)
        if self.live is None:
            say_stage(self.console, text)
        self._refresh()

    def _row(self, trial_id: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
        row = self.rows.setdefault(trial_id, {"trial_id": trial_id, "status": "pending",
                                              "max_epochs": self.max_epochs})
        row.update({k: v for k, v in (config or {}).items()
                    if not k.startswith("_") and k not in row})
        return row

    def add(self, trial_id: str, config: dict[str, Any] | None = None) -> None:
        """A trial the searcher proposed: pending until Ray starts it."""
        if trial_id not in self.rows:
            self._row(trial_id, config)
            self._refresh()

    def start(self, trial_id: str, config: dict[str, Any] | None = None) -> None:
        """A trial started (or was restored): running, no epoch yet."""
        row = self._row(trial_id, config)
        if row["status"] not in ENDED:
            row["status"] = "running"
        self._refresh()

    def result(self, trial_id: str, result: dict[str, Any], config: dict[str, Any] | None = None
               ) -> None:
        """An epoch's report. Reports may come out of order or twice (a resumed trial reports
        its last epoch again); each epoch counts once, and the best val_loss is shown with the
        kappa of the same epoch. A report after the trial's end changes nothing."""
        row = self._row(trial_id, config)
        if row["status"] in ENDED or result.get("epoch") is None:
            return
        seen = self._seen.setdefault(trial_id, {})
        epoch = int(result["epoch"])
        seen[epoch] = (_number(result.get("val_loss")), _number(result.get("val_study_kappa")))
        last = max(seen)
        scored = [(loss, e) for e, (loss, _) in seen.items() if loss is not None]
        best_loss, best_epoch = min(scored) if scored else (None, None)
        reported_best = _number(result.get("best_val_loss"))
        kappa = seen[best_epoch][1] if best_epoch is not None else None
        if reported_best is not None and (best_loss is None or reported_best < best_loss):
            best_loss, kappa = reported_best, None  # its best epoch came before a resume
        row.update(status="running", epoch=last, val_loss=seen[last][0],
                   best_val_loss=best_loss, val_study_kappa=kappa)
        self._refresh()

    def end(self, row: dict[str, Any]) -> None:
        """A trial ended: ``row`` is its recorded row (:func:`trial_summary`). Its status,
        epochs, best val_loss and kappa replace whatever the live results said."""
        ended = dict(row)
        ended.setdefault("max_epochs", self.max_epochs)
        ended["epoch"] = ended.get("epochs")
        last = self._seen.get(str(row["trial_id"]), {})
        ended["val_loss"] = last[max(last)][0] if last else None
        self.rows[str(row["trial_id"])] = {**self.rows.get(str(row["trial_id"]), {}), **ended}
        if self.console is not None and not self.console.is_terminal:
            self.console.print(end_line(ended))
        self._refresh()

    # ------------------------------------------------------------------ drawing

    def render(self):
        """The bar and the table (the last ``shown`` trials by id), fitted to the console."""
        from rich.console import Group

        rows = sorted(self.rows.values(), key=lambda r: r["trial_id"])[-self.shown:]
        width = self.console.width if self.console is not None else None
        return Group(self.progress, trials_table(rows, params=self.params, width=width))

    def _refresh(self) -> None:
        if self.progress is None:
            return
        done = self.epochs_done()
        # A stage ('starting trials') is shown until the first epoch is in.
        description = "training" if done else self.progress.tasks[0].description
        self.progress.update(self.task, total=self.budget(), completed=done,
                             description=description)
        if self.live is not None:
            self.live.update(self.render())

    def __enter__(self):
        from rich.live import Live

        if self.console is not None and self.console.is_terminal:
            self.live = Live(self.render(), console=self.console, refresh_per_second=2)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.update(self.render())
            self.live.__exit__(*exc)
            self.live = None
