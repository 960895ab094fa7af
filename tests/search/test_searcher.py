"""Searcher and sampler: Optuna told which trials ASHA stopped early; TPE sees running trials
at the epoch they reached."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.samplers import RandomSampler
from optuna.trial import TrialState, create_trial

from raysearch.search.searcher import (
    MultiFidelitySearch,
    MultiFidelityTPESampler,
    make_sampler,
    tpe_startup_trials,
)
from raysearch.search.space import load_search_space

X = {"x": FloatDistribution(-1.0, 1.0)}


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for multivariate TPE
        yield


def demo_spec(seed: int = 0):
    spec = load_search_space("search_spaces/demo.yaml")
    return dataclasses.replace(spec, search=dataclasses.replace(spec.search, seed=seed))


def test_tpe_starts_modelling_within_small_budgets():
    assert tpe_startup_trials(demo_spec()) == 2  # 8 trials: TPE, not random search, from the third
    assert tpe_startup_trials(load_search_space("search_spaces/mura.yaml")) == 10


def test_make_sampler_is_seeded_tpe_or_random():
    assert isinstance(make_sampler(demo_spec()), MultiFidelityTPESampler)
    spec = demo_spec()
    spec = dataclasses.replace(spec, search=dataclasses.replace(spec.search, algorithm="random"))
    assert isinstance(make_sampler(spec), RandomSampler)

    def first_points(sampler) -> list[float]:
        study = optuna.create_study(sampler=sampler)
        return [study.ask(X).params["x"] for _ in range(3)]

    assert first_points(make_sampler(demo_spec(3))) == first_points(make_sampler(demo_spec(3)))


def _study_with_a_promoted_running_trial(sampler, *, report: bool):
    """ASHA-style history: eleven trials all over [-1, 1] stopped at the 3-epoch rung, the best
    near x = -1. Three trials near x = 0.8 still run, promoted past the 9-epoch rung (when
    ``report``); their losses (0.6, then 0.5) are worse than the best 3-epoch ones (0.3) only
    because they are compared at other epochs."""
    study = optuna.create_study(sampler=sampler)
    for x in np.linspace(-1.0, 1.0, 11):
        study.add_trial(create_trial(
            params={"x": float(x)}, distributions=X, state=TrialState.PRUNED,
            intermediate_values={1: 1.0, 2: 0.9, 3: 0.3 + 0.2 * (x + 1.0)},
        ))
    running = []
    for x in (0.8, 0.78, 0.82):
        study.enqueue_trial({"x": x})
        trial = study.ask(X)
        if report:
            trial.report(0.6, step=3)
            trial.report(0.5, step=9)
        running.append(trial)
    return study, running


def _next_x(sampler_factory, *, report: bool, seeds=range(5)) -> float:
    """Mean over seeds of the next point each study asks for."""
    xs = []
    for seed in seeds:
        study, _ = _study_with_a_promoted_running_trial(sampler_factory(seed), report=report)
        xs.append(study.ask(X).params["x"])
    return float(np.mean(xs))


def plain_tpe(constant_liar: bool):
    return lambda seed: optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=2, constant_liar=constant_liar)


def ours(seed):
    return make_sampler(demo_spec(seed))


def test_running_trials_count_at_the_rung_they_reached():
    """TPE proposes near trials still training past the deepest rung; plain TPE cannot see them
    (or, with the constant liar, counts them as bad) and stays near the best 3-epoch trial."""
    assert _next_x(ours, report=True) > 0.3
    assert _next_x(plain_tpe(False), report=True) < -0.3
    assert _next_x(plain_tpe(True), report=True) < -0.3


def test_silent_running_trials_stay_invisible_and_the_study_untouched():
    # Trials that reported nothing are not counted, not even as bad ones (unlike the liar).
    assert _next_x(ours, report=False) == pytest.approx(_next_x(plain_tpe(False), report=False))
    study, running = _study_with_a_promoted_running_trial(ours(0), report=True)
    study.ask(X)
    for t in running:
        frozen = study.trials[t.number]
        assert frozen.state == TrialState.RUNNING and frozen.value is None
    study.tell(running[0], 0.01)
    assert study.trials[running[0].number].value == 0.01


# ----------------------------------------------------------------------------- the searcher


def _search(max_epochs: int = 9) -> MultiFidelitySearch:
    return MultiFidelitySearch(space=X, metric="best_val_loss", mode="min",
                               sampler=RandomSampler(seed=0), max_epochs=max_epochs)


def _run(search, trial_id: str, losses: list[float], *, stopped_on: dict | None = None,
         error: bool = False) -> None:
    """Report ``losses`` as epochs 1, 2, ...; the last result ends the trial (Tune passes a
    result a scheduler stops the trial on only to ``on_trial_complete``)."""
    search.suggest(trial_id)
    results = [{"epoch": e, "best_val_loss": v} for e, v in enumerate(losses, 1)]
    for r in results[:-1]:
        search.on_trial_result(trial_id, r)
    if error:
        if results:
            search.on_trial_result(trial_id, results[-1])
        search.on_trial_complete(trial_id, error=True)
    else:
        search.on_trial_complete(trial_id, result={**results[-1], **(stopped_on or {})})


def test_searcher_tells_optuna_what_the_scheduler_did():
    search = _search(max_epochs=9)
    _run(search, "full", [0.7, 0.6, 0.5, 0.5, 0.45, 0.45, 0.44, 0.44, 0.43])
    _run(search, "rung3", [0.8, 0.7, 0.65])  # ASHA stopped it at its first rung
    _run(search, "patience", [0.9, 0.9, 0.9, 0.9], stopped_on={"early_stopped": True})
    _run(search, "crashed", [0.8, 0.75], error=True)
    _run(search, "crashed-at-once", [], error=True)
    _run(search, "nan-at-the-end", [0.8] * 8 + [float("nan")])
    full, rung3, patience, crashed, at_once, nan = search._ot_study.trials

    assert full.state == TrialState.COMPLETE and full.value == 0.43
    assert full.intermediate_values[9] == 0.43 and len(full.intermediate_values) == 9
    # Stopped early: PRUNED at the epoch reached, valued there (not a finished 3-epoch trial).
    assert rung3.state == TrialState.PRUNED and rung3.value == 0.65
    assert rung3.intermediate_values == {1: 0.8, 2: 0.7, 3: 0.65}
    # The trial's own patience ended it: that is its final value.
    assert patience.state == TrialState.COMPLETE and patience.value == 0.9
    assert crashed.state == TrialState.PRUNED and crashed.last_step == 2
    assert at_once.state == TrialState.FAIL
    assert nan.state == TrialState.PRUNED and nan.last_step == 8 and nan.value == 0.8


def test_a_resumed_trial_repeating_epochs_is_reported_once(tmp_path):
    search = _search(max_epochs=9)
    search.suggest("t")
    for epoch in (1, 2):
        search.on_trial_result("t", {"epoch": epoch, "best_val_loss": 1.0 / epoch})
    # The driver died; Ray restores the searcher and the trial reports from its checkpoint.
    search.save(str(tmp_path / "searcher.pkl"))
    restored = _search(max_epochs=9)
    restored.restore(str(tmp_path / "searcher.pkl"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns when a step is reported twice
        restored.on_trial_result("t", {"epoch": 2, "best_val_loss": 0.5})
        restored.on_trial_result("t", {"epoch": 3, "best_val_loss": 0.4})
        restored.on_trial_complete("t", result={"epoch": 9, "best_val_loss": 0.3})
    (trial,) = restored._ot_study.trials
    assert trial.intermediate_values == {1: 1.0, 2: 0.5, 3: 0.4, 9: 0.3}
    assert trial.state == TrialState.COMPLETE and trial.value == 0.3
