"""The one-worker lighter path: the loop runs in the trial's Tune driver, and its checkpoints
land where Ray Train's would, the best and the latest kept."""

from __future__ import annotations

import json
import os

from raysearch.experiment import run_checkpoints, trial_summary
from raysearch.train.inline import InlineSession, inline_enabled
from raysearch.train.trainer import driver_resources

FILES = ("model.pt", "train_state.pt", "trial.json", "val_predictions.parquet")


def _folder(tmp_path, epoch: int, val_loss: float, history: list) -> str:
    d = tmp_path / f"out{epoch}"
    d.mkdir()
    for name in FILES:
        (d / name).write_text("x")
    metrics = {"epoch": epoch, "val_loss": val_loss, "val_study_kappa": epoch / 10,
               "epoch_time_s": 1.0, "val_time_s": 0.5}
    history.append(metrics)
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "history.json").write_text(json.dumps(history))
    return str(d)


def test_checkpoints_are_stored_like_ray_trains_and_pruned_to_best_and_latest(tmp_path):
    run_dir = str(tmp_path / "exp" / "train-t1")
    session = InlineSession(run_dir)
    assert session.get_checkpoint() is None
    history: list = []
    for epoch, loss in ((1, 0.7), (2, 0.5), (3, 0.6), (4, 0.65)):
        session._store(_folder(tmp_path, epoch, loss, history), epoch=epoch)
        session._prune(latest=os.path.join(run_dir, f"checkpoint_{epoch:06d}"))
    names = sorted(os.listdir(run_dir))
    assert names == ["checkpoint_000002", "checkpoint_000004"]  # best (0.5) and latest
    epochs = sorted(m["epoch"] for _, m in run_checkpoints(run_dir))
    assert epochs == [2, 4]
    ckpt = session.get_checkpoint()  # the latest, as Ray Train would hand a resumed worker
    assert ckpt.path.rstrip("/").endswith("checkpoint_000004")
    row, frame = trial_summary(str(tmp_path / "exp"), "t1", config={}, max_epochs=8)
    assert (row["status"], row["epochs"], row["best_epoch"]) == ("pruned", 4, 2)
    assert len(frame) == 4


def test_a_killed_upload_leaves_no_checkpoint_name(tmp_path):
    run_dir = str(tmp_path / "train-t2")
    session = InlineSession(run_dir)
    os.makedirs(os.path.join(run_dir, ".tmp-checkpoint_000001"))  # a driver killed mid-upload
    session._store(_folder(tmp_path, 1, 0.7, []), epoch=1)
    assert sorted(os.listdir(run_dir)) == ["checkpoint_000001"]


def test_one_worker_trials_run_inline_and_hold_the_workers_resources(monkeypatch):
    run = {"workers": 1, "cpus_per_worker": 0.99, "gpus_per_worker": 0.0}
    assert inline_enabled(1) and not inline_enabled(2)
    assert driver_resources(run, driver_cpu=0.01) == {"cpu": 0.99}
    assert driver_resources({**run, "gpus_per_worker": 1.0}, driver_cpu=0.01) == {
        "cpu": 0.99, "gpu": 1.0}
    assert driver_resources({**run, "workers": 2}, driver_cpu=0.01) == {"cpu": 0.01}
    monkeypatch.setenv("RAYSEARCH_INLINE_TRIALS", "0")
    assert not inline_enabled(1)
    assert driver_resources(run, driver_cpu=0.01) == {"cpu": 0.01}
