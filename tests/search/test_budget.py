"""Tests for the search budget (raysearch.search.budget and SampleBudget): durations parsed with
units, a restored search generator that takes a larger trial count (extend), and a deadline after
which no trial is proposed while the saved state stays open for a later run. Ray's own
SearchGenerator machinery runs for real; Ray is not started."""

from __future__ import annotations

import pickle
import time

import pytest
import yaml
from ray import cloudpickle
from ray.tune.experiment import Experiment
from ray.tune.search import ConcurrencyLimiter, Searcher

from raysearch.cli import main
from raysearch.errors import ConfigError
from raysearch.search.budget import parse_duration
from raysearch.search.searcher import SampleBudget
from raysearch.search.tune import _same_space, extended_num_samples, saved_num_samples


@pytest.mark.parametrize("text, seconds", [
    ("90", 90), (90, 90), ("90s", 90), ("30m", 1800), ("6h", 21600), ("1.5h", 5400),
    ("1h30m", 5400), ("2d", 172800), (" 45 M ", 2700),
])
def test_durations_take_seconds_minutes_hours_days(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["6x", "h", "", "-5", "0", "0h", "1h 30", "soon", "inf", "1h1h", "30m1h"])
def test_a_bad_duration_names_the_option_and_the_value(text):
    with pytest.raises(ConfigError, match=r"--time-budget: .*" + repr(text).replace("'", ".")):
        parse_duration(text)


def test_the_cli_refuses_a_bad_budget_or_two_counts_before_reading_the_space(capsys):
    assert main(["tune", "no-such-space.yaml", "--time-budget", "soon"]) == 2
    assert "--time-budget: 'soon' is not a duration" in capsys.readouterr().err
    assert main(["tune", "no-such-space.yaml", "--extend", "2", "--num-samples", "9"]) == 2
    assert "--extend and --num-samples: give one of them" in capsys.readouterr().err


class _Counting(Searcher):
    """A searcher that proposes x = 0, 1, 2, ... (what Optuna would propose, minus Optuna)."""

    def __init__(self):
        super().__init__(metric="loss", mode="min")
        self.n = 0

    def suggest(self, trial_id):
        self.n += 1
        return {"x": self.n}

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass

    def get_state(self):
        return {"n": self.n}

    def set_state(self, state):
        self.n = state["n"]


def _generator(num_samples=None, deadline=None, *, asked=2):
    g = SampleBudget(ConcurrencyLimiter(_Counting(), max_concurrent=10), num_samples=num_samples,
                     deadline=deadline)
    g.add_configurations(Experiment("budget", run=lambda config: None, num_samples=asked))
    return g


def _propose(g, most=10):
    trials = []
    while not g.is_finished() and len(trials) < most:
        t = g.next_trial()
        if t is None:
            break
        trials.append(t)
    return trials


def test_a_restored_generator_takes_a_larger_count_and_only_a_larger_one():
    first = _generator(asked=2)
    assert len(_propose(first)) == 2 and first.is_finished()
    saved = first.get_state()

    extended = _generator(num_samples=3)
    extended.set_state(dict(saved))  # as Tune restores it
    assert not extended.is_finished() and extended.total_samples == 3
    assert len(_propose(extended)) == 1 and extended.is_finished()

    for count in (None, 1):  # a plain resume, or a smaller count: the saved count holds
        resumed = _generator(num_samples=count)
        resumed.set_state(dict(saved))
        assert resumed.total_samples == 2 and _propose(resumed) == []


def test_after_the_deadline_nothing_is_proposed_and_a_later_run_goes_on():
    spent = _generator(deadline=time.time() - 1, asked=5)
    assert _propose(spent) == [] and spent.budget_spent and spent.is_finished()
    state = spent.get_state()
    assert state["finished"] is False and state["counter"] == 0  # a later run may go on
    later = _generator(num_samples=5, deadline=time.time() + 3600)
    later.set_state(state)
    assert len(_propose(later)) == 5 and not later.budget_spent


def test_the_deadline_stops_proposing_midway_and_is_not_pickled():
    g = _generator(deadline=time.time() + 3600, asked=4)
    assert len(_propose(g, most=2)) == 2
    g._deadline = time.time() - 1  # the budget runs out with two trials proposed
    assert _propose(g) == [] and g.budget_spent
    copy = pickle.loads(cloudpickle.dumps(g))  # as tuner.pkl holds it
    assert copy._deadline is None and not copy.budget_spent and copy._num_samples is None


def test_the_trial_count_alone_does_not_make_another_space():
    base = {"name": "x", "storage": "/a", "search": {"num_samples": 4, "seed": 0},
            "space": {"lr": {"choice": [0.1, 0.01]}}}
    more = {**base, "storage": "/b", "search": {"num_samples": 9, "seed": 0}}
    other = {**base, "space": {"lr": {"choice": [0.1, 0.02]}}}
    assert _same_space(yaml.safe_dump(base), yaml.safe_dump(more))
    assert not _same_space(yaml.safe_dump(base), yaml.safe_dump(other))
    assert saved_num_samples(yaml.safe_dump(base)) == 4


def test_how_many_trials_run_at_once_does_not_make_another_space():
    """A search started with --max-concurrent 1 (saved as resources.max_concurrent) and extended
    without it, or with another limit, is the same search: it was refused as 'a different search
    space'. What each trial holds still counts."""
    base = {"name": "x", "search": {"num_samples": 2}, "space": {"lr": {"choice": [0.1, 0.01]}},
            "resources": {"workers_per_trial": 1, "max_concurrent": 1}}
    for limit in ({"workers_per_trial": 1}, {"workers_per_trial": 1, "max_concurrent": 4}):
        assert _same_space(yaml.safe_dump(base), yaml.safe_dump({**base, "resources": limit}))
    wider = {**base, "resources": {"workers_per_trial": 2, "max_concurrent": 1}}
    assert not _same_space(yaml.safe_dump(base), yaml.safe_dump(wider))


@pytest.mark.parametrize("change, named", [
    ({"space": {"lr": {"choice": [0.1, 0.02]}}}, "space.lr.choice: [0.1, 0.01] saved, [0.1, 0.02] now"),
    ({"space": {"lr": {"choice": [0.1, 0.01]}, "wd": {"choice": [0]}}}, "space.wd: absent when saved, now {choice: [0]}"),
    ({"space": {}}, "space.lr: saved, now absent"),
    ({"search": {"num_samples": 2, "seed": 1}}, "search.seed: 0 saved, 1 now"),
])  # fmt: skip
def test_a_changed_space_is_named_by_its_first_differing_key(change, named):
    from raysearch.search.tune import space_difference

    base = {"name": "x", "search": {"num_samples": 2, "seed": 0},
            "space": {"lr": {"choice": [0.1, 0.01]}}}
    assert space_difference(yaml.safe_dump(base), yaml.safe_dump(base)) is None
    assert space_difference(yaml.safe_dump(base), yaml.safe_dump({**base, **change})) == named


def test_extend_adds_to_the_saved_count(tmp_path, tiny_root):
    from raysearch.search.space import parse_search_space

    raw = {"name": "grow", "storage": str(tmp_path), "data": {"root": tiny_root},
           "search": {"num_samples": 3}, "space": {"lr": {"choice": [0.1, 0.01]}}}
    spec = parse_search_space(raw)
    with pytest.raises(ConfigError, match="--extend: no experiment to extend at .*grow"):
        extended_num_samples(spec, 2)
    (tmp_path / "grow").mkdir()
    (tmp_path / "grow" / "search_space.yaml").write_text(yaml.safe_dump(spec.to_dict()))
    assert extended_num_samples(spec, 2).search.num_samples == 5
    with pytest.raises(ConfigError, match="--extend: must be >= 1"):
        extended_num_samples(spec, 0)


def test_a_saved_search_restores_with_more_trials_and_refuses_fewer_or_another_space(tmp_path):
    """On tests/fixtures/saved-v0.2 (Ray's saved state, no Ray started): the same space with
    more trials restores it, fewer trials or a changed space is refused."""
    import os
    import shutil

    from raysearch.search.space import parse_search_space
    from raysearch.search.tune import _check_existing

    fixture = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "saved-v0.2")
    shutil.copytree(fixture, tmp_path / "saved-v0.2")
    raw = yaml.safe_load((tmp_path / "saved-v0.2" / "search_space.yaml").read_text())
    raw["storage"] = str(tmp_path)

    def check(**changes):
        spec = parse_search_space({**raw, **changes})
        return _check_existing(spec, spec.experiment_dir, yaml.safe_dump(spec.to_dict()),
                               resume=False, overwrite=False)

    assert check() is True
    assert check(search={**raw["search"], "num_samples": 5}) is True
    with pytest.raises(ConfigError, match="num_samples: 1 is fewer than the 2 trials"):
        check(search={**raw["search"], "num_samples": 1})
    with pytest.raises(ConfigError, match="with a different search space") as info:
        check(space={**raw["space"], "lr": {"loguniform": [0.001, 0.1]}})
    # the refusal names what changed, so the user knows which edit to undo
    assert "(space.lr.loguniform: " in str(info.value) and "0.1] now)" in str(info.value)
