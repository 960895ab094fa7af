"""Sampler: seeded TPE that sees trials ASHA keeps running by their best reported value."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.samplers import RandomSampler
from optuna.trial import TrialState, create_trial

from raysearch.config import load_search_space
from raysearch.sampler import RunningBestTPESampler, make_sampler, tpe_startup_trials

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
    assert isinstance(make_sampler(demo_spec()), RunningBestTPESampler)
    spec = demo_spec()
    spec = dataclasses.replace(spec, search=dataclasses.replace(spec.search, algorithm="random"))
    assert isinstance(make_sampler(spec), RandomSampler)

    def first_points(sampler) -> list[float]:
        study = optuna.create_study(sampler=sampler)
        return [study.ask(X).params["x"] for _ in range(3)]

    assert first_points(make_sampler(demo_spec(3))) == first_points(make_sampler(demo_spec(3)))


def _study_with_promising_running_trials(sampler, *, report: bool):
    """Finished trials all over [-1, 1], the best at x = -1 (0.1). Three trials near x = 0.8
    still run (promoted by ASHA); when ``report``, they have reached 0.02, better than any
    finished one, whose neighbours all finished badly (1.5)."""
    study = optuna.create_study(sampler=sampler)
    for x in np.linspace(-1.0, 1.0, 11):
        value = 1.5 if x > 0.5 else x + 1.1
        study.add_trial(create_trial(params={"x": float(x)}, distributions=X, value=value))
    running = []
    for x in (0.8, 0.78, 0.82):
        study.enqueue_trial({"x": x})
        trial = study.ask(X)
        if report:
            trial.report(0.3, step=3)  # its best so far goes down as it trains
            trial.report(0.02, step=9)
        running.append(trial)
    return study, running


def _next_x(sampler_factory, *, report: bool, seeds=range(5)) -> float:
    """Mean over seeds of the next point each study asks for."""
    xs = []
    for seed in seeds:
        study, _ = _study_with_promising_running_trials(sampler_factory(seed), report=report)
        xs.append(study.ask(X).params["x"])
    return float(np.mean(xs))


def plain_tpe(constant_liar: bool):
    return lambda seed: optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=2, constant_liar=constant_liar)


def ours(seed):
    return make_sampler(demo_spec(seed))


def test_running_trials_count_with_their_best_reported_value():
    """TPE proposes near trials that are still training and already the best; plain TPE cannot
    see them and stays near the best finished trial."""
    assert _next_x(ours, report=True) > 0.3
    assert _next_x(plain_tpe(False), report=True) < -0.5
    assert _next_x(plain_tpe(True), report=True) < -0.5


def test_silent_running_trials_stay_invisible_and_the_study_untouched():
    # Trials that reported nothing are not counted, not even as bad ones (unlike the liar).
    assert _next_x(ours, report=False) == pytest.approx(_next_x(plain_tpe(False), report=False))
    study, running = _study_with_promising_running_trials(ours(0), report=True)
    study.ask(X)
    for t in running:
        frozen = study.trials[t.number]
        assert frozen.state == TrialState.RUNNING and frozen.value is None
    study.tell(running[0], 0.01)
    assert study.trials[running[0].number].value == 0.01
