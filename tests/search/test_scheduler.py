"""ASHA's rungs rebuilt from the trials' checkpoints after a killed driver (ray#30838)."""

from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from ray.tune.schedulers import TrialScheduler

from raysearch.experiment import CHECKPOINT_FILES
from raysearch.search.scheduler import make_scheduler, restore_rungs, trial_histories
from raysearch.search.space import load_search_space


@pytest.fixture
def asha_spec(small_space):
    spec = load_search_space(small_space)
    return dataclasses.replace(spec, scheduler=dataclasses.replace(
        spec.scheduler, kind="asha", max_epochs=27, grace_period=3, reduction_factor=3))


def _live(spec):
    sched = make_scheduler(spec)
    sched.set_search_properties("best_val_loss", "min")
    return sched


def _run(sched, histories):
    """Feed the histories to ``sched`` as Tune would, epoch by epoch, trials interleaved;
    a trial ASHA stops reports no more. Returns the histories as far as each trial got."""
    trials = {tid: SimpleNamespace(trial_id=tid) for tid in histories}
    for t in trials.values():
        sched.on_trial_add(None, t)
    seen = {tid: [] for tid in histories}
    longest = max(len(h) for h in histories.values())
    live = set(histories)
    for i in range(longest):
        for tid in sorted(live):
            if i >= len(histories[tid]):
                sched.on_trial_complete(None, trials[tid], histories[tid][-1])
                live.discard(tid)
                continue
            seen[tid].append(histories[tid][i])
            if sched.on_trial_result(None, trials[tid], histories[tid][i]) == TrialScheduler.STOP:
                sched.on_trial_complete(None, trials[tid], histories[tid][i])
                live.discard(tid)
    for tid in live:
        sched.on_trial_complete(None, trials[tid], histories[tid][-1])
    return seen


def _histories(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for k in range(n):
        level, best, rows = rng.uniform(0.4, 0.7), np.inf, []
        for epoch in range(1, 28):
            best = min(best, level + rng.normal(0, 0.03) + 0.3 / epoch)
            rows.append({"epoch": epoch, "val_loss": best, "best_val_loss": best})
        out[f"t{k:02d}"] = rows
    return out


def _rungs(sched):
    (bracket,) = sched._brackets
    return {milestone: dict(recorded) for milestone, recorded in bracket._rungs}


def test_restored_rungs_equal_what_asha_recorded(asha_spec):
    live = _live(asha_spec)
    reported = _run(live, _histories(12))
    assert {m: len(r) for m, r in _rungs(live).items()}[3] == 12  # every trial met rung 3
    assert any(len(h) < 27 for h in reported.values())  # and ASHA stopped some

    restored = make_scheduler(asha_spec)  # what Tuner.restore hands back: empty rungs
    made = restore_rungs(restored, reported, metric="best_val_loss", mode="min")
    assert made == sum(len(r) for r in _rungs(live).values())
    assert _rungs(restored) == _rungs(live)


def test_a_restored_scheduler_judges_new_trials_against_old_ones(asha_spec):
    reported = _run(_live(asha_spec), _histories(9, seed=1))
    bad = {"epoch": 3, "best_val_loss": 5.0}
    newcomer = SimpleNamespace(trial_id="new")

    forgetful = make_scheduler(asha_spec)  # Ray's restore: the newcomer meets an empty rung
    forgetful.set_search_properties("best_val_loss", "min")
    forgetful.on_trial_add(None, newcomer)
    assert forgetful.on_trial_result(None, newcomer, bad) == TrialScheduler.CONTINUE

    restored = make_scheduler(asha_spec)
    restore_rungs(restored, reported, metric="best_val_loss", mode="min")
    restored.set_search_properties("best_val_loss", "min")  # what fit() does after restore
    restored.on_trial_add(None, newcomer)
    assert restored.on_trial_result(None, newcomer, bad) == TrialScheduler.STOP

    # A restored trial that had passed rung 9 is not judged there again when it goes on.
    survivor = next(t for t, h in reported.items() if len(h) > 9)
    trial = SimpleNamespace(trial_id=survivor)
    restored.on_trial_add(None, trial)
    worse = {"epoch": 10, "best_val_loss": 5.0}
    assert restored.on_trial_result(None, trial, worse) == TrialScheduler.CONTINUE


def test_fifo_has_no_rungs(asha_spec):
    fifo = make_scheduler(dataclasses.replace(
        asha_spec, scheduler=dataclasses.replace(asha_spec.scheduler, kind="fifo")))
    assert restore_rungs(fifo, _histories(2), metric="best_val_loss", mode="min") == 0


def test_trial_histories_read_the_latest_checkpoint(tmp_path):
    def ckpt(run, epoch, history):
        d = tmp_path / run / f"checkpoint_{epoch:06d}"
        d.mkdir(parents=True)
        for name in CHECKPOINT_FILES:  # a checkpoint with a missing or empty file is no result
            (d / name).write_bytes(b"x")
        (d / "metrics.json").write_text(json.dumps({"epoch": epoch, "val_loss": 0.5}))
        if history is not None:
            (d / "history.json").write_text(history)
        else:
            (d / "history.json").unlink()

    rows = [{"epoch": e, "best_val_loss": 0.9 - e / 10} for e in (1, 2, 3)]
    ckpt("train-aaa", 2, json.dumps(rows[:2]))
    ckpt("train-aaa", 3, json.dumps(rows))
    ckpt("train-bbb", 1, "{not json")  # being written when the driver died
    os.makedirs(tmp_path / "train-ccc")  # no checkpoint yet
    (tmp_path / "tuner.pkl").write_bytes(b"")
    assert trial_histories(str(tmp_path)) == {"aaa": rows}
    assert trial_histories(str(tmp_path / "missing")) == {}
