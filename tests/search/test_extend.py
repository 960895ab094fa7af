"""Extending a finished search (``--extend`` / a larger ``--num-samples``): the same experiment
goes on with new trials, the earlier ones kept with their results and the Optuna study restored
with them. One end-to-end run through the Python API (``raysearch.tune``); the time budget is
tested at the unit level in ``test_budget.py``."""

from __future__ import annotations

import glob
import io
import os
import pickle

import pytest
from rich.console import Console

import raysearch

EXTEND_SPACE = """
name: grow
data: {{root: {root}, val_fraction: 0.2, seed: 0}}
resources: {{workers_per_trial: 1, max_concurrent: 1, max_failures: 0}}
search: {{algorithm: tpe, seed: 0, num_samples: 2}}
scheduler: {{kind: asha, max_epochs: 1, grace_period: 1, reduction_factor: 2}}
storage: {storage}
trial: {{weights: none, batch_size: 16, image_size: 32, arch: mobilenet_v3_small, augment: none}}
space:
  lr: {{loguniform: [0.001, 0.01]}}
"""


def _optuna_trials(exp_dir: str):
    """The Optuna study Ray saved with the searcher: the searcher-state-<session>.pkl of the
    latest session, the one Ray itself restores (file times do not tell: a sync rewrites both)."""
    newest = max(glob.glob(os.path.join(exp_dir, "searcher-state-*.pkl")))
    with open(newest, "rb") as f:
        state = pickle.load(f)  # written by this test's own search
    return state["_ot_study"].trials


@pytest.mark.slow
def test_a_finished_search_extended_keeps_its_trials_and_its_optuna_study(
    tmp_path, tiny_root, ray_session
):
    space = tmp_path / "grow.yaml"
    space.write_text(EXTEND_SPACE.format(root=tiny_root, storage=tmp_path / "reports"))
    quiet = Console(file=io.StringIO(), width=120)

    first = raysearch.tune(str(space), console=quiet)
    assert isinstance(first, raysearch.Experiment) and first.state == "finished"
    before = first.trials.set_index("trial_id")
    assert len(before) == 2

    console = Console(file=io.StringIO(), width=120)
    second = raysearch.tune(str(space), extend=1, console=console)
    after = second.trials.set_index("trial_id")
    assert second.path == first.path and second.state == "finished"
    assert len(after) == 3 and second.info["num_samples"] == 3
    # The first two trials are the same trials, with the same results; the third is new.
    assert set(before.index) < set(after.index)
    for tid in before.index:
        assert after.loc[tid, "best_val_loss"] == before.loc[tid, "best_val_loss"]
        assert after.loc[tid, "lr"] == before.loc[tid, "lr"]
    (new,) = set(after.index) - set(before.index)
    assert after.loc[new, "status"] == "completed"
    assert set(second.epochs["trial_id"]) == set(after.index)
    # Optuna's study came back with the earlier trials: three trials, the first two finished
    # with the values their Tune trials reached, before the third was asked for.
    ot = _optuna_trials(second.path)
    assert len(ot) == 3
    assert sorted(t.value for t in ot[:2]) == pytest.approx(sorted(before["best_val_loss"]))
    assert ot[2].params["lr"] == pytest.approx(after.loc[new, "lr"])
    # ASHA's rungs were rebuilt from the earlier trials' checkpoints.
    assert "ASHA rungs rebuilt from the checkpoints of 2 trial(s)" in console.file.getvalue()
