"""Search stage, the results: what a search's trials left, read back as tables.

``collect_results`` turns a finished (or resumed) search into one row per trial and one per epoch,
from the checkpoints each trial wrote rather than from Tune's result files, which a restored trial
rewrites (see :func:`raysearch.experiment.trial_summary`). The live view is in ``progress``.
"""

from __future__ import annotations

import pandas as pd

from raysearch.errors import plain
from raysearch.experiment import results_tables, trial_summary
from raysearch.search.space import SearchSpace

__all__ = ["collect_results", "trial_row"]


# ----------------------------------------------------------------------------- results


def collect_results(
    grid, spec: SearchSpace, *, unfinished: set[str] = frozenset()
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per trial and one per epoch (:func:`raysearch.experiment.trial_summary` for each
    trial of Tune's result grid).

    A trial that Tune had not ended when the search stopped (Ctrl-C) is ``unfinished``:
    ``unfinished`` holds their ids, as Ray's saved state records them (Ray marks the trials it
    stopped on Ctrl-C TERMINATED in memory, RUNNING in the saved state). A trial Ray ended without
    an error, before ``max_epochs`` and not on its own patience, was stopped by ASHA: ``pruned``.
    """
    rows, frames = [], []
    # ResultGrid keeps its results in the order of the analysis' Trial objects, which carry ids.
    for trial, result in zip(grid._experiment_analysis.trials, grid):
        config = result.config or {}
        trial_id = str(trial.trial_id)
        status = None
        if not result.error and (trial_id in unfinished
                                 or trial.status in ("PENDING", "RUNNING", "PAUSED")):
            status = "unfinished"
        row, epochs = trial_row(
            spec, trial_id, config, error=_error_line(result.error), status=status,
            wall_time_s=(result.metrics or {}).get("time_total_s"),
        )
        rows.append(row)
        frames.append(epochs)
    return results_tables(rows, frames)


def trial_row(spec: SearchSpace, trial_id: str, config: dict, *, error: str | None = None,
              status: str | None = None, wall_time_s: float | None = None):
    """A trial's row of ``trials.parquet`` and its epoch rows, from its recorded checkpoints
    (:func:`raysearch.experiment.trial_summary` with the trial's resolved config). The live
    view's end-of-trial lines come from here too, so they say what ``trials.parquet`` says."""
    names = [p.name for p in spec.space]
    full = spec.trial_config({k: config[k] for k in names if k in config}).to_dict()
    return trial_summary(spec.experiment_dir, trial_id, config=full,
                         max_epochs=spec.scheduler.max_epochs, error=error, status=status,
                         wall_time_s=wall_time_s)


def _error_line(error: BaseException | None) -> str | None:
    """The last non-empty line of a trial's error (Ray puts the root cause last), at most 500
    characters; None for no error."""
    if not error:
        return None
    lines = [line.strip() for line in plain(str(error)).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


# ----------------------------------------------------------------------------- trust


# ----------------------------------------------------------------------------- live view


