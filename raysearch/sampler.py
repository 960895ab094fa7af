"""Tune stage, the searcher's model: Optuna's TPE made aware of trials that ASHA keeps running.

Ray's ``OptunaSearch`` tells Optuna a trial's value only when the trial ends. Under ASHA the
trials that run longest are the ones it promoted, the best so far; on a GPU cluster a promoted
MURA trial trains for an hour or more. Plain TPE is blind to them all that time and keeps
proposing from the trials that were stopped early. Optuna's "constant liar" is worse: it counts
every running trial as a bad one, steering TPE away from the best region while it trains (seen in
``raysearch bench search``: while a promoted ResNet-18 at 96 px trained, TPE proposed only
MobileNets).

:class:`RunningBestTPESampler` lets TPE see a running trial with the best value it has reported
so far. raysearch's objective is ``best_val_loss`` (see ``tune.OBJECTIVE``), which can only go
down as a trial trains, so that value never flatters a trial: it is what the trial has already
achieved. Trials that have reported nothing yet stay invisible, as in plain TPE.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from optuna.samplers import RandomSampler, TPESampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from raysearch.config import SearchSpace

__all__ = ["RunningBestTPESampler", "make_sampler", "tpe_startup_trials"]


def make_sampler(spec: SearchSpace):
    """The Optuna sampler of ``spec.search``: seeded random search, or seeded TPE that counts
    running trials by their best reported value."""
    if spec.search.algorithm == "random":
        return RandomSampler(seed=spec.search.seed)
    return RunningBestTPESampler(
        seed=spec.search.seed, n_startup_trials=tpe_startup_trials(spec), constant_liar=False
    )


def tpe_startup_trials(spec: SearchSpace) -> int:
    """Random trials before TPE starts to model the space.

    Optuna's default is 10, which makes any search of 10 trials or fewer (every CPU demo) plain
    random search. A third of the budget (between 2 and 10) lets TPE act in small searches too.
    """
    return max(2, min(10, spec.search.num_samples // 3))


class RunningBestTPESampler(TPESampler):
    """TPE that sees each running trial with intermediate values as a finished trial whose
    value is the best of them (see the module docstring). Finished trials, and what is stored
    in the study, are untouched: only the sampler's view of the study changes."""

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial):
        return super().infer_relative_search_space(_RunningBestView(study, trial), trial)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space) -> dict[str, Any]:
        return super().sample_relative(_RunningBestView(study, trial), trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name, param_distribution):
        return super().sample_independent(
            _RunningBestView(study, trial), trial, param_name, param_distribution
        )


class _RunningBestView:
    """A read-only view of ``study`` in which every RUNNING trial other than ``current`` that
    has reported intermediate values appears COMPLETE, valued at the best of them. Everything
    else is the study itself."""

    def __init__(self, study: Study, current: FrozenTrial) -> None:
        self._study = study
        self._current = current.number

    def __getattr__(self, name: str):
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False):
        # The study's trial cache only covers finished trials; a view that finishes running
        # ones must read them all.
        trials = [self._as_finished(t) for t in self._study._get_trials(deepcopy=deepcopy)]
        return trials if states is None else [t for t in trials if t.state in states]

    def get_trials(self, deepcopy: bool = True, states=None):
        return self._get_trials(deepcopy=deepcopy, states=states)

    def _as_finished(self, trial: FrozenTrial) -> FrozenTrial:
        if (
            trial.state != TrialState.RUNNING
            or trial.number == self._current
            or not trial.intermediate_values
        ):
            return trial
        values = [v for v in trial.intermediate_values.values() if math.isfinite(v)]
        if not values:
            return trial
        best = min(values) if self._study.direction == StudyDirection.MINIMIZE else max(values)
        seen = copy.copy(trial)
        seen.state = TrialState.COMPLETE
        seen.value = float(best)
        return seen
