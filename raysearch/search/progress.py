"""Search stage, the driver's Tune callbacks: the live Rich view of the search
(:class:`SearchProgress`) and the signing of Ray's state as Ray saves it (:class:`TrustCallback`).
"""

from __future__ import annotations

from typing import Any

from raysearch.experiment import sign_ray_state
from raysearch.report.live import ENDED
from raysearch.search.space import SearchSpace

__all__ = ["LiveCallback", "SearchProgress", "TrustCallback"]


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


def _trial_error(trial) -> str | None:
    """The last line of a failed trial's error, as ``trials.parquet`` keeps it."""
    from raysearch.search.results import _error_line

    try:
        error = trial.get_error()
    except Exception:  # noqa: BLE001 - no error file (yet), or one Ray cannot read back
        error = None
    return _error_line(error) or "trial failed"


class LiveCallback(_progress_base()):
    """A Tune callback that drives a :class:`~raysearch.report.live.LiveView` (``self.view``) on
    the driver: used as a context manager around ``fit()``; ``stage`` shows what the driver is
    doing. Subclasses set ``view`` and ``console`` and feed the view from Tune's events."""

    view = None
    console = None

    # Ray pickles the run config (with its callbacks) into the experiment state; the console and
    # the live display hold locks and cannot travel. A restored copy renders nothing.
    def __getstate__(self):
        return {**self.__dict__, "console": None, "view": None}

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        return self.view.rows if self.view is not None else {}

    def stage(self, text: str) -> None:
        if self.view is not None:
            self.view.stage(text)

    def __enter__(self):
        if self.view is not None:
            self.view.__enter__()
        return self

    def __exit__(self, *exc):
        if self.view is not None:
            self.view.__exit__(*exc)


class SearchProgress(LiveCallback):
    """A Tune callback that keeps a live Rich view on the driver (:class:`LiveView`): a bar over
    the epoch budget with an ETA, and a table of trials (id, status, epoch k/max, val_loss, best,
    kappa at the best epoch, key config values).

    A trial's end is told from its recorded results, the row ``trials.parquet`` gets
    (:func:`raysearch.search.results.trial_row`), not from the last result that reached this
    callback: Ray may deliver that one after ``on_trial_complete``, and ASHA's stop may land
    between a report and its delivery.
    """

    def __init__(self, spec: SearchSpace, *, console) -> None:
        from raysearch.report.live import LiveView

        self.spec = spec
        self.console = console
        self.view = LiveView(num_trials=spec.search.num_samples,
                             max_epochs=spec.scheduler.max_epochs, console=console)

    def _summary(self, trial, *, error: str | None) -> dict[str, Any]:
        from raysearch.search.results import trial_row

        row, _ = trial_row(self.spec, str(trial.trial_id), dict(trial.config or {}), error=error)
        return row

    def on_step_end(self, iteration, trials, **info):
        """Trials the searcher proposed and Ray has not started yet (pending), and trials that
        had ended before this run (a resumed search): their recorded rows."""
        if self.view is None:
            return
        for trial in trials:
            trial_id = str(trial.trial_id)
            self.view.add(trial_id, trial.config)
            ended = self.view.rows[trial_id].get("status") in ENDED
            if not ended and trial.status in ("TERMINATED", "ERROR"):
                self._end(trial, error=_trial_error(trial) if trial.status == "ERROR" else None)

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.view is not None:
            self.view.start(str(trial.trial_id), trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.view is None:
            return
        if result.get("resume_note") and self.console is not None:
            self.console.print(f"[yellow]trial {trial.trial_id}: {result['resume_note']}[/]")
        self.view.result(str(trial.trial_id), result, trial.config)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, error=None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, error=_trial_error(trial))

    def _end(self, trial, *, error: str | None) -> None:
        if self.view is None:
            return
        try:
            row = self._summary(trial, error=error)
        except Exception as e:  # noqa: BLE001 - storage unreachable: the view must not end the search
            import logging

            logging.getLogger("raysearch").warning("trial %s: no summary (%s)", trial.trial_id, e)
            return
        self.view.end(row)
