"""Train: one trial under Ray Train on the tiny demo data (CPU, tiny images)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from raysearch.config import TrialConfig
from raysearch.data.mura import MURA_TASK
from raysearch.train.loop import lr_lambda, val_metrics
from raysearch.train.trainer import run_single


def write_config(path, root, storage, **trial) -> str:
    cfg = {
        "name": "t",
        "storage": str(storage),
        "data": {"root": root, "val_fraction": 0.2, "seed": 0},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
        "arch": "resnet18",
        "weights": "none",
        "image_size": 32,
        "batch_size": 16,
        "lr": 1e-3,
        "optimizer": "adam",
        "augment": "none",
        "class_weighting": "none",
        "max_epochs": 2,
    }
    cfg.update(trial)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def checkpoints(run_dir: str) -> list[str]:
    return sorted(
        os.path.join(run_dir, d) for d in os.listdir(run_dir)
        if d.startswith("checkpoint_") and os.path.isdir(os.path.join(run_dir, d))
    )


def test_val_metrics_study_level():
    frame = pd.DataFrame(
        {
            "study_id": ["a", "a", "b", "c", "c", "c"],
            "patient_id": ["p1", "p1", "p2", "p3", "p3", "p3"],
            "body_part": ["WRIST", "WRIST", "WRIST", "HAND", "HAND", "HAND"],
            "label": [1, 1, 0, 1, 1, 1],
        }
    )
    probs = np.array([0.9, 0.3, 0.2, 0.6, 0.6, 0.2], dtype=np.float32)
    m = val_metrics(frame, probs, MURA_TASK)
    # Studies: a mean 0.6 -> 1 (correct); b 0.2 -> 0 (correct); c mean 0.467 -> 0 (wrong).
    assert m["val_study_accuracy"] == pytest.approx(2 / 3)
    expected_loss = -np.mean(
        [np.log(0.9), np.log(0.3), np.log(0.8), np.log(0.6), np.log(0.6), np.log(0.2)]
    )
    assert m["val_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert "val_kappa_wrist" in m and "val_kappa_hand" in m and "val_kappa_elbow" not in m


def test_cosine_schedule_warms_up_then_decays():
    f = lr_lambda(TrialConfig(max_epochs=4, warmup_epochs=1, lr_schedule="cosine"), 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(39) < 0.01
    assert all(f(i) >= f(i + 1) for i in range(10, 39))


@pytest.mark.slow
def test_two_epochs_lower_the_loss_and_checkpoint_predictions(tmp_path, tiny_root, ray_session,
                                                              capsys):
    config = write_config(tmp_path / "t.yaml", tiny_root, tmp_path / "runs", max_epochs=3)
    epochs = run_single(config)
    assert list(epochs["epoch"]) == [1, 2, 3]
    # Tiny data from scratch is noisy epoch to epoch; training must still get below epoch 1.
    assert epochs["train_loss"].iloc[1:].min() < epochs["train_loss"].iloc[0]
    for key in ("val_loss", "val_auc", "val_study_accuracy", "val_study_kappa",
                "epoch_time_s", "train_images_per_s"):
        assert np.isfinite(epochs[key]).all(), key
    run_dir = str(tmp_path / "runs" / "t" / "train-single")
    ckpts = checkpoints(run_dir)
    assert 1 <= len(ckpts) <= 2  # the best by val_loss and the latest
    latest = ckpts[-1]
    for name in ("model.pt", "train_state.pt", "trial.json", "val_predictions.parquet"):
        assert os.path.exists(os.path.join(latest, name)), name
    preds = pd.read_parquet(os.path.join(latest, "val_predictions.parquet"))
    manifest = pd.read_parquet(tmp_path / "runs" / "t" / "manifest.parquet")
    val = manifest[manifest.split == "val"]
    assert sorted(preds["image_path"]) == sorted(val["image_path"])
    assert preds["prob"].between(0, 1).all()
    with open(os.path.join(latest, "trial.json")) as f:
        trial = TrialConfig.from_dict(json.load(f))
    assert trial.arch == "resnet18" and trial.image_size == 32
    state = torch.load(os.path.join(latest, "model.pt"), weights_only=True)
    assert any(k.endswith("fc.1.weight") for k in state)

    # Running the same command again with more epochs resumes from the saved epoch. Through
    # the command line: `raysearch train` shows tune's live view on stdout, its stage lines and
    # the trial's end line from its recorded row (epochs of max, the best epoch and its kappa).
    from raysearch.cli import main
    from raysearch.report.tables import fmt

    capsys.readouterr()
    config = write_config(tmp_path / "t.yaml", tiny_root, tmp_path / "runs", max_epochs=4)
    assert main(["train", config]) == 0
    shown = capsys.readouterr()
    resumed = pd.read_parquet(tmp_path / "runs" / "t" / "epochs.parquet").sort_values("epoch")
    assert list(resumed["epoch"]) == [1, 2, 3, 4]
    best = int(resumed["val_loss"].idxmin())
    assert "starting Ray ..." in shown.out and "starting the worker ..." in shown.out
    assert (f"trial single completed after 4/4 epochs: best val_loss "
            f"{fmt(float(resumed['val_loss'].min()))} at epoch {resumed['epoch'][best]}, val "
            f"study kappa {fmt(float(resumed['val_study_kappa'][best]))} (resnet18, 32 px)"
            ) in shown.out, shown.out
    assert "trial single" not in shown.err
    # Epochs 1-3 come from the checkpoint, not from training them again.
    np.testing.assert_allclose(resumed["train_loss"].to_numpy()[:3], epochs["train_loss"])

    # A complete experiment: one trial in trials.parquet, ensembled and predicted with like a
    # search's.
    exp = str(tmp_path / "runs" / "t")
    trials = pd.read_parquet(os.path.join(exp, "trials.parquet"))
    assert list(trials["trial_id"]) == ["single"] and trials["status"].iloc[0] == "completed"
    assert trials["best_checkpoint"].iloc[0].startswith("train-single/checkpoint_")
    assert len(pd.read_parquet(os.path.join(exp, "epochs.parquet"))) == 4
    with open(os.path.join(exp, "experiment.json")) as f:
        info = json.load(f)
    assert info["kind"] == "train" and info["state"] == "finished"
    assert info["task"]["labels"] == ["abnormal"] and info["task"]["group"] == "body_part"
    from rich.console import Console

    from raysearch.ensemble.run import run_ensemble
    from raysearch.inference.predictor import Predictor

    out = run_ensemble(experiment=exp, top=1, n_boot=20,
                       console=Console(file=io.StringIO(), width=120))
    members = pd.read_parquet(os.path.join(out, "members.parquet"))
    assert list(members["trial_id"]) == ["single"]
    studies = pd.read_parquet(os.path.join(out, "study_predictions.parquet"))
    predictor = Predictor.from_dir(exp)
    test = manifest[manifest.split == "test"]
    _, again = predictor.predict_studies(test)
    mine = studies[studies.split == "test"].set_index("study_id")["prob"]
    np.testing.assert_allclose(again.set_index("study_id")["prob"].reindex(mine.index), mine,
                               atol=1e-6)


@pytest.mark.slow
def test_two_worker_ddp_on_cpu(tmp_path, tiny_root, ray_session):
    config = write_config(
        tmp_path / "ddp.yaml", tiny_root, tmp_path / "runs", max_epochs=1,
        resources={"workers_per_trial": 2, "cpus_per_worker": 0.5},
    )
    epochs = run_single(config)
    assert list(epochs["epoch"]) == [1]
    assert np.isfinite(epochs["val_loss"]).all()
