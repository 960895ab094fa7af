"""The live view's end-of-trial lines and rows come from the trial's recorded results (the row
trials.parquet gets), whatever order Ray delivers the results in."""

from __future__ import annotations

import io
import json
import os

import pytest
from rich.console import Console

from raysearch.search.progress import SearchProgress
from raysearch.search.results import trial_row
from raysearch.search.space import parse_search_space

VAL_LOSS = [0.70, 0.50, 0.60, 0.65]
KAPPA = [0.10, 0.40, 0.20, 0.30]  # the best epoch (2) has kappa 0.4, the last one 0.3


def _spec(tmp_path, *, max_epochs: int):
    raw = {
        "name": "live", "data": {"root": str(tmp_path)}, "storage": str(tmp_path / "reports"),
        "search": {"num_samples": 3},
        "scheduler": {"kind": "asha", "max_epochs": max_epochs, "grace_period": 1},
        "space": {"lr": {"loguniform": [1e-4, 1e-2]}, "arch": {"choice": ["resnet18"]}},
    }
    return parse_search_space(raw)


def _result(epoch: int) -> dict:
    return {"epoch": epoch, "val_loss": VAL_LOSS[epoch - 1],
            "best_val_loss": min(VAL_LOSS[:epoch]), "val_study_kappa": KAPPA[epoch - 1],
            "epoch_time_s": 1.0, "val_time_s": 0.5}


def _record(exp_dir: str, trial_id: str, epochs: int) -> None:
    """What a trial leaves on storage after ``epochs`` epochs: Ray keeps the best checkpoint (by
    val_loss) and the latest; each holds the history of every epoch so far."""
    history = [_result(e) for e in range(1, epochs + 1)]
    best = min(history, key=lambda h: h["val_loss"])["epoch"]
    for epoch in sorted({best, epochs}):
        folder = os.path.join(exp_dir, f"train-{trial_id}", f"checkpoint_{epoch:06d}")
        os.makedirs(folder)
        for name in ("model.pt", "train_state.pt", "trial.json", "val_predictions.parquet"):
            with open(os.path.join(folder, name), "w") as f:
                f.write("x")
        with open(os.path.join(folder, "metrics.json"), "w") as f:
            json.dump(history[epoch - 1], f)
        with open(os.path.join(folder, "history.json"), "w") as f:
            json.dump(history[:epoch], f)


class FakeTrial:
    """What the callbacks read of Ray's Trial."""

    def __init__(self, trial_id: str, config: dict) -> None:
        self.trial_id, self.config = trial_id, config

    def get_error(self):
        return RuntimeError("worker died\nValueError: boom")


def _run(tmp_path, *, max_epochs: int, ran: int, order: list, error: bool = False):
    spec = _spec(tmp_path, max_epochs=max_epochs)
    trial = FakeTrial("abc12_00000", {"lr": 1e-3, "arch": "resnet18"})
    _record(spec.experiment_dir, trial.trial_id, ran)
    out = io.StringIO()
    progress = SearchProgress(spec, console=Console(file=out, width=100, color_system=None))
    progress.on_trial_start(0, [trial], trial)
    for step in order:
        if step == "end" and error:
            progress.on_trial_error(0, [trial], trial)
        elif step == "end":
            progress.on_trial_complete(0, [trial], trial)
        else:
            progress.on_trial_result(0, [trial], trial, _result(step))
    recorded, _ = trial_row(spec, trial.trial_id, trial.config,
                            error="ValueError: boom" if error else None)
    return progress.rows[trial.trial_id], recorded, out.getvalue()


@pytest.mark.parametrize("order", [[1, 2, 3, 4, "end"], [1, 2, 3, "end", 4], [2, 1, "end", 4, 3]])
def test_a_pruned_trials_line_is_its_recorded_result(tmp_path, order):
    row, recorded, printed = _run(tmp_path, max_epochs=8, ran=4, order=order)
    assert recorded["status"] == "pruned" and recorded["epochs"] == 4
    assert recorded["val_study_kappa"] == pytest.approx(0.40)  # the best epoch's, not the last's
    for key in ("status", "epochs", "best_val_loss", "best_epoch", "val_study_kappa"):
        assert row[key] == recorded[key], key
    assert "trial abc12_00000 pruned after 4/8 epochs" in printed
    assert "best val_loss 0.500 at epoch 2, val study kappa 0.400" in printed
    assert "0.300" not in printed  # the last epoch's kappa is not the trial's


def test_a_trial_at_max_epochs_is_completed_even_when_its_last_result_comes_late(tmp_path):
    row, recorded, printed = _run(tmp_path, max_epochs=4, ran=4, order=[1, 2, "end", 3, 4])
    assert recorded["status"] == "completed"
    assert (row["status"], row["epochs"]) == ("completed", 4)
    assert "trial abc12_00000 completed after 4/4 epochs" in printed


def test_a_failed_trial_says_failed_with_the_epochs_it_recorded(tmp_path):
    row, recorded, printed = _run(tmp_path, max_epochs=8, ran=3, order=[1, 2, 3, "end"],
                                  error=True)
    assert (row["status"], row["epochs"]) == (recorded["status"], recorded["epochs"]) == ("failed", 3)
    assert "trial abc12_00000 failed after 3/8 epochs" in printed and "ValueError: boom" in printed


def test_live_rows_pair_the_best_val_loss_with_the_kappa_of_its_epoch(tmp_path):
    spec = _spec(tmp_path, max_epochs=8)
    progress = SearchProgress(spec, console=Console(file=io.StringIO(), width=100))
    trial = FakeTrial("t1", {"lr": 1e-3})
    for epoch in (3, 1, 2, 4):  # out of order
        progress.on_trial_result(0, [trial], trial, _result(epoch))
    row = progress.rows["t1"]
    assert (row["epoch"], row["best_val_loss"], row["val_study_kappa"]) == (4, 0.50, 0.40)
    assert row["status"] == "running"


def test_the_bar_counts_epochs_against_the_budget_that_shrinks_as_trials_end(tmp_path):
    spec = _spec(tmp_path, max_epochs=8)  # 3 trials x 8 epochs
    _record(spec.experiment_dir, "a", 4)
    progress = SearchProgress(spec, console=Console(file=io.StringIO(), width=100))
    view = progress.view
    assert (view.epochs_done(), view.budget()) == (0, 24)
    a, b = FakeTrial("a", {"lr": 1e-3}), FakeTrial("b", {"lr": 1e-3})
    for epoch in (1, 2, 3, 4):
        progress.on_trial_result(0, [a, b], a, _result(epoch))
    progress.on_trial_result(0, [a, b], b, _result(1))
    assert (view.epochs_done(), view.budget()) == (5, 24)
    progress.on_trial_complete(0, [a, b], a)  # pruned at 4 of 8: four epochs fewer to go
    assert (view.epochs_done(), view.budget()) == (5, 20)


def test_a_resumed_search_shows_the_trials_that_had_ended_with_their_recorded_rows(tmp_path):
    spec = _spec(tmp_path, max_epochs=8)
    _record(spec.experiment_dir, "old", 4)
    progress = SearchProgress(spec, console=Console(file=io.StringIO(), width=100))
    old, new = FakeTrial("old", {"lr": 1e-3}), FakeTrial("new", {"lr": 1e-3})
    old.status, new.status = "TERMINATED", "PENDING"
    progress.on_step_end(0, [old, new])
    assert (progress.rows["old"]["status"], progress.rows["old"]["epochs"]) == ("pruned", 4)
    assert progress.rows["new"]["status"] == "pending"
    assert progress.view.budget() == 4 + 2 * 8  # the ended trial counts what it ran
