"""Transfer-learning modes through real trials: a `head` trial under Ray Train leaves the staged
backbone exactly as it was, and a search chooses among head, gradual and full from staged
weights (what `raysearch weights stage-demo` gives the CPU demo)."""

from __future__ import annotations

import io
import json
import os

import pandas as pd
import pytest
import torch

from raysearch.train.pretrain import stage_demo_weights
from raysearch.train.trainer import run_single
from tests.train.test_worker import checkpoints, write_config


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> str:
    """Stand-in pretrained resnet18 weights: one epoch on a tiny source draw, 32 px."""
    to = tmp_path_factory.mktemp("demo_weights")
    path = stage_demo_weights(str(to), arch="resnet18", image_size=32, epochs=1, size="tiny")
    info = json.loads((to / "resnet18.json").read_text())
    assert info["head"] == "removed" and info["epochs"] == 1
    return path


def test_staged_weights_have_no_head_and_load_like_imagenet_files(staged):
    from raysearch.models.factory import create_model

    state = torch.load(staged, weights_only=True)
    assert "conv1.weight" in state and not any(k.startswith("fc.") for k in state)
    model = create_model("resnet18", weights=staged)
    assert torch.equal(model.state_dict()["layer4.1.bn2.running_var"],
                       state["layer4.1.bn2.running_var"])


def test_a_head_trial_leaves_the_backbone_and_its_statistics_as_staged(
        tmp_path, tiny_root, ray_session, staged):
    config = write_config(tmp_path / "head.yaml", tiny_root, tmp_path / "runs", max_epochs=2,
                          weights=staged, finetune="head", lr=1e-2, precise_bn_images=64)
    epochs = run_single(config)
    assert list(epochs["epoch"]) == [1, 2]
    latest = checkpoints(str(tmp_path / "runs" / "t" / "train-single"))[-1]
    trained = torch.load(os.path.join(latest, "model.pt"), weights_only=True)
    source = torch.load(staged, weights_only=True)
    moved = [k for k in source if not torch.equal(source[k], trained[k])]
    assert moved == []  # weights, BatchNorm running means, variances and batch counters
    assert {"fc.1.weight", "fc.1.bias"} <= set(trained)
    trials = pd.read_parquet(tmp_path / "runs" / "t" / "trials.parquet")
    assert trials["finetune"].tolist() == ["head"]


FINETUNE_SPACE = """
name: finetune
data: {{root: {root}, val_fraction: 0.2, seed: 0}}
resources: {{workers_per_trial: 1, max_concurrent: 2, max_failures: 0}}
search:
  algorithm: tpe
  seed: 0
  num_samples: 3
  points_to_evaluate:
    - {{finetune: head}}
    - {{finetune: gradual}}
    - {{finetune: full}}
scheduler: {{kind: fifo, max_epochs: 2, grace_period: 1}}
storage: {storage}
trial: {{weights: {weights}, arch: resnet18, image_size: 32, batch_size: 16, augment: light,
         lr: 0.003, warmup_epochs: 1, precise_bn_images: 64}}
space:
  finetune: {{choice: [full, head, gradual]}}
  backbone_lr_mult: {{choice: [0.1, 1.0], when: {{finetune: [full, gradual]}}}}
"""


@pytest.mark.slow
def test_a_search_chooses_among_the_finetune_modes(tmp_path, tiny_root, ray_session, staged):
    from rich.console import Console

    from raysearch.search.space import load_search_space
    from raysearch.search.tune import run_search

    space = tmp_path / "finetune.yaml"
    space.write_text(FINETUNE_SPACE.format(root=tiny_root, storage=tmp_path / "reports",
                                           weights=staged))
    exp = run_search(load_search_space(str(space)), console=Console(file=io.StringIO(), width=120))
    trials = pd.read_parquet(os.path.join(exp, "trials.parquet"))
    assert sorted(trials["finetune"]) == ["full", "gradual", "head"]
    assert (trials["status"] == "completed").all(), trials[["finetune", "status"]]
    assert trials["best_val_loss"].notna().all()
    epochs = pd.read_parquet(os.path.join(exp, "epochs.parquet"))
    assert (epochs.groupby("trial_id")["epoch"].max() == 2).all()
