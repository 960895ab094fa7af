"""Search stage, the searcher: Optuna's TPE told what ASHA did, at the fidelity it was done.

ASHA judges trials at rungs (3, 9, 27 epochs in a real search) and stops most of them early. Ray's
``OptunaSearch`` tells Optuna every trial it stops as COMPLETE, valued at its last epoch, and it
counts Tune's ``training_iteration`` (which starts again at 1 when a trial resumes) as the step.
TPE then compares a 3-epoch loss with a 27-epoch one as if both were final, and a resumed trial
reports steps Optuna already holds.

:class:`MultiFidelitySearch` tells Optuna what happened: each epoch is an intermediate value at
``step = epoch``; a trial that reached ``max_epochs`` (or stopped on its own patience) is COMPLETE;
a trial the scheduler stopped early is PRUNED at the epoch it reached, which is how Optuna records
a trial its own Hyperband pruner stops. Optuna's TPE ranks PRUNED trials after COMPLETE ones,
deeper rungs first, then by value, close to BOHB's rule (Falkner et al., 2018) of modelling the
deepest budget that has enough observations.

Optuna's TPE ignores a trial until it ends, and under ASHA the trials that run longest
are the ones it promoted, the best so far; on a GPU cluster a promoted MURA trial trains for an
hour or more. :class:`MultiFidelityTPESampler` sees each running trial that has reported epochs as
it would be seen if ASHA stopped it now: PRUNED at the epoch it has reached. Optuna's "constant
liar" would count it as a bad trial instead, steering TPE away from the best region while it
trains (seen in ``raysearch bench search``: while a promoted ResNet-18 at 96 px trained, TPE
proposed only MobileNets).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

from optuna.samplers import RandomSampler, TPESampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from raysearch.search.space import Param, SearchSpace

__all__ = [
    "MultiFidelitySearch", "MultiFidelityTPESampler", "SampleBudget", "make_sampler",
    "tpe_startup_trials",
]


def make_sampler(spec: SearchSpace):
    """The Optuna sampler of ``spec.search``: seeded random search, or seeded (multivariate) TPE
    that sees running trials at the epoch they have reached."""
    if spec.search.algorithm == "random":
        return RandomSampler(seed=spec.search.seed)
    return MultiFidelityTPESampler(
        seed=spec.search.seed, n_startup_trials=tpe_startup_trials(spec), constant_liar=False
    )


def tpe_startup_trials(spec: SearchSpace) -> int:
    """Random trials before TPE starts to model the space.

    Optuna's default is 10, which makes any search of 10 trials or fewer (every CPU demo) plain
    random search. A third of the budget (between 2 and 10) lets TPE act in small searches too.
    """
    return max(2, min(10, spec.search.num_samples // 3))


class DefineByRun:
    """An Optuna define-by-run function: samples in file order, honouring ``when`` conditions.

    A class rather than a closure because Ray pickles the searcher with the experiment state.
    """

    def __init__(self, space: tuple[Param, ...]) -> None:
        self.space = space

    def __call__(self, trial) -> dict[str, Any]:
        values: dict[str, Any] = {}
        constants: dict[str, Any] = {}
        for p in self.space:
            if not p.applies(values):
                continue
            if p.kind == "constant":
                constants[p.name] = values[p.name] = p.values[0]
            elif p.kind == "choice":
                values[p.name] = trial.suggest_categorical(p.name, list(p.values))
            elif p.kind == "int":
                values[p.name] = trial.suggest_int(
                    p.name, int(p.low), int(p.high), step=int(p.step or 1)
                )
            else:
                values[p.name] = trial.suggest_float(
                    p.name, float(p.low), float(p.high), log=p.kind == "loguniform",
                    step=p.step if p.kind == "uniform" else None,
                )
        return constants


class MultiFidelitySearch(OptunaSearch):
    """Ray's ``OptunaSearch`` with epochs as Optuna steps and scheduler-stopped trials PRUNED
    (see the module docstring). ``max_epochs`` is the search's: a trial that reports it finished.
    Everything else, saving and restoring included, is Ray's."""

    def __init__(self, *args, max_epochs: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._max_epochs = int(max_epochs)
        self._last_epoch: dict[str, int] = {}  # saved with the searcher, like Optuna's study

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials:
            return super().on_trial_result(trial_id, result)  # Ray warns
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        if result:
            # Tune does not pass a result the scheduler stopped the trial on to on_trial_result.
            self._report(trial_id, result)
        value = (result or {}).get(self.metric)
        finished = value is not None and math.isfinite(float(value)) and not error and (
            int(result.get("epoch", 0)) >= self._max_epochs or bool(result.get("early_stopped"))
        )
        if finished:
            self._ot_study.tell(self._ot_trials[trial_id], value, state=TrialState.COMPLETE)
        elif error and trial_id not in self._last_epoch:
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.FAIL)
        else:
            # Stopped by the scheduler, or failed after some epochs: it counts as far as it got
            # (Optuna values a pruned trial at its last intermediate value).
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)

    def _report(self, trial_id: str, result: dict) -> None:
        value, epoch = result.get(self.metric), result.get("epoch")
        if value is None or epoch is None or not math.isfinite(float(value)):
            return
        # A resumed trial reports its last epoch again; Optuna holds it already.
        if int(epoch) <= self._last_epoch.get(trial_id, 0):
            return
        self._last_epoch[trial_id] = int(epoch)
        self._ot_trials[trial_id].report(float(value), int(epoch))


class MultiFidelityTPESampler(TPESampler):
    """TPE that sees each running trial with intermediate values as PRUNED at its last step
    (see the module docstring). Finished trials, and what is stored in the study, are untouched:
    only the sampler's view of the study changes."""

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial):
        return super().infer_relative_search_space(_RunningAsPrunedView(study, trial), trial)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space) -> dict[str, Any]:
        return super().sample_relative(_RunningAsPrunedView(study, trial), trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name, param_distribution):
        return super().sample_independent(
            _RunningAsPrunedView(study, trial), trial, param_name, param_distribution
        )


class _RunningAsPrunedView:
    """A read-only view of ``study`` in which every RUNNING trial other than ``current`` that
    has reported a finite intermediate value appears PRUNED, valued at its last one, as
    ``study.tell(trial, state=PRUNED)`` would leave it. Everything else is the study itself."""

    def __init__(self, study: Study, current: FrozenTrial) -> None:
        self._study = study
        self._current = current.number

    def __getattr__(self, name: str):
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False):
        # The study's trial cache only covers finished trials; a view that finishes running
        # ones must read them all.
        trials = [self._as_pruned(t) for t in self._study._get_trials(deepcopy=deepcopy)]
        return trials if states is None else [t for t in trials if t.state in states]

    def get_trials(self, deepcopy: bool = True, states=None):
        return self._get_trials(deepcopy=deepcopy, states=states)

    def _as_pruned(self, trial: FrozenTrial) -> FrozenTrial:
        if (
            trial.state != TrialState.RUNNING
            or trial.number == self._current
            or trial.last_step is None
        ):
            return trial
        last = trial.intermediate_values[trial.last_step]
        if not math.isfinite(last):
            return trial
        seen = copy.copy(trial)
        seen.state = TrialState.PRUNED
        seen.value = float(last)
        return seen


class SampleBudget(SearchGenerator):
    """Ray's ``SearchGenerator`` with a trial count that a restore may raise and a deadline after
    which it proposes no trial (see :mod:`raysearch.search.budget` for why).

    ``num_samples``: the count this run asks for (``None``: whatever the experiment holds);
    ``deadline``: a ``time.time()`` value, or None for no time budget. ``budget_spent`` says
    whether the deadline stopped it from proposing a trial it would otherwise have proposed.
    """

    def __init__(self, searcher, *, num_samples: int | None = None,
                 deadline: float | None = None) -> None:
        super().__init__(searcher)
        self._num_samples = num_samples
        self._deadline = deadline
        self.budget_spent = False

    def set_state(self, state: dict) -> None:
        """Ray's restore, then this run's trial count (when larger) and a generator that may
        propose again (a time budget or an earlier count had ended it)."""
        super().set_state(state)
        if self._num_samples is not None and self._num_samples > self._total_samples:
            self._total_samples = int(self._num_samples)
        self._finished = False

    def create_trial_if_possible(self, experiment_spec: dict):
        if self._deadline is not None and self._counter < self._total_samples \
                and time.time() >= self._deadline:
            self.budget_spent = True
            return None  # not `finished` in the saved state: a later run may go on
        return super().create_trial_if_possible(experiment_spec)

    def is_finished(self) -> bool:
        return self.budget_spent or super().is_finished()

    # Pickled with the Tuner (tuner.pkl): the deadline and count belong to one run only.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_num_samples=None, _deadline=None, budget_spent=False)
        return state
