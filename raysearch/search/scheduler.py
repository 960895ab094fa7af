"""Search stage, the scheduler: ASHA keyed on epochs, whose rungs survive a killed driver.

Ray saves the searcher's state with an experiment, but not the scheduler's
(ray-project/ray#30838): ``Tuner.restore`` gives back the ``ASHAScheduler`` the experiment was
created with, its rungs empty. After a resume every trial would then be compared only with the
trials that reached its rung since, and the first trial to reach a rung would meet an empty one
and always go on: the search forgets the trials it has already judged.

raysearch rebuilds the rungs before the restored search starts. Each trial's latest checkpoint
carries its ``history.json``, every epoch it reported, so each trial is recorded at every rung it
had reached, with the objective it reported at that rung's epoch: what ASHA had recorded before
the driver died. A restored trial that had passed a rung is not judged at it again, as before.
"""

from __future__ import annotations

import os
from typing import Any

from raysearch.experiment import latest_history, run_checkpoints
from raysearch.search.space import SearchSpace
from raysearch.storage import get_fs, join

__all__ = ["asha_scheduler", "make_scheduler", "restore_rungs", "trial_histories"]


def make_scheduler(spec: SearchSpace):
    """ASHA on ``epoch`` with the spec's rungs, or FIFO. Metric and mode come from the
    ``TuneConfig`` (Ray refuses them in both places)."""
    from ray.tune.schedulers import FIFOScheduler

    if spec.scheduler.kind != "asha":
        return FIFOScheduler()
    return asha_scheduler(
        max_epochs=spec.scheduler.max_epochs, grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


def asha_scheduler(*, max_epochs: int, grace_period: int, reduction_factor: float, **kwargs):
    """Ray's ``ASHAScheduler`` as raysearch runs it: rungs on ``epoch``, one bracket."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=grace_period,
                         reduction_factor=reduction_factor, **kwargs)


def trial_histories(experiment_dir: str) -> dict[str, list[dict[str, Any]]]:
    """Trial id -> the epochs its latest checkpoint records (``train-<id>/checkpoint_*``)."""
    fs, path = get_fs(experiment_dir)
    if not fs.exists(path):
        return {}
    out = {}
    for entry in sorted(fs.ls(path, detail=False)):
        name = os.path.basename(entry.rstrip("/"))
        if not name.startswith("train-"):
            continue
        try:
            history = latest_history(run_checkpoints(join(experiment_dir, name)))
        except (OSError, ValueError):
            continue  # a checkpoint being written when the driver died: as if it never was
        if history:
            out[name.removeprefix("train-")] = history
    return out


def restore_rungs(scheduler, histories: dict[str, list[dict[str, Any]]], *, metric: str,
                  mode: str) -> int:
    """Record every trial at every ASHA rung its history reached, with ``metric`` at that epoch,
    as ASHA itself would have. Returns how many (trial, rung) records were made; a FIFO scheduler
    gets none. ``metric`` and ``mode`` are the search's: a scheduler restored from ``tuner.pkl``
    has not been given them yet."""
    from ray.tune.schedulers import AsyncHyperBandScheduler

    if not isinstance(scheduler, AsyncHyperBandScheduler):
        return 0
    time_attr = scheduler._time_attr
    sign = {"min": -1.0, "max": 1.0}[mode]  # ASHA keeps rewards: higher is better
    # raysearch's ASHA has one bracket (Ray's default); with more, a trial's bracket is a random
    # draw made when it was added and is lost with the driver.
    (bracket,) = scheduler._brackets
    made = 0
    for trial_id, history in histories.items():
        by_time = {int(h[time_attr]): h for h in history if h.get(metric) is not None}
        for milestone, recorded in bracket._rungs:
            # ASHA records a trial at its first result at or past the milestone.
            first = min((t for t in by_time if t >= milestone), default=None)
            if first is not None and trial_id not in recorded:
                recorded[trial_id] = sign * float(by_time[first][metric])
                made += 1
    return made
