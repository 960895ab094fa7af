"""Transfer-learning modes: what a head, gradual or last-N-blocks trial trains, and what it leaves
exactly as the pretrained weights had it (parameters and BatchNorm statistics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from raysearch.config import TrialConfig
from raysearch.data.augment import DeviceAugment
from raysearch.data.cache import ArrayStore
from raysearch.data.loader import BatchLoader
from raysearch.errors import ConfigError
from raysearch.models.factory import create_model, recompute_bn_stats
from raysearch.models.finetune import (
    backbone_blocks,
    backbone_trains,
    freeze_batchnorm,
    head_module,
    optimizer_groups,
    set_trainable,
)
from raysearch.models.registry import ARCHITECTURES, BLOCKS
from raysearch.train.loop import make_optimizer, train_epoch


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_has_the_registered_number_of_blocks_and_they_cover_its_backbone(arch):
    with torch.device("meta"):
        model = create_model(arch)
    blocks = backbone_blocks(model, arch)
    assert len(blocks) == BLOCKS[arch]
    head = {id(p) for p in head_module(model, arch).parameters()}
    in_blocks = {id(p) for block in blocks for m in block for p in m.parameters()}
    assert not head & in_blocks
    params = [p for p in model.parameters() if id(p) not in head]
    # The stem (before the first block; VGG has none) is all that is left out, and it is small.
    stem = sum(p.numel() for p in params if id(p) not in in_blocks)
    assert 0 <= stem < 0.05 * sum(p.numel() for p in params)
    assert all(sum(p.numel() for m in block for p in m.parameters()) > 0 for block in blocks)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(model, cfg: TrialConfig, *, epochs: int = 1):
    """A few real training steps on random images with learnable labels (bright = positive)."""
    rng = np.random.default_rng(0)
    n = 48
    labels = (rng.random((n, 1)) > 0.5).astype(np.float32)
    images = rng.integers(0, 120, size=(n, 32, 32), dtype=np.uint8) + (labels[:, :, None] * 100
                                                                      ).astype(np.uint8)
    store = ArrayStore(images)
    loader = BatchLoader(store, np.arange(n), labels, batch_size=16, shuffle=True, seed=0)
    optimizer = make_optimizer(cfg, optimizer_groups(
        model, cfg.arch, mode=cfg.finetune, lr=cfg.lr, backbone_lr_mult=cfg.backbone_lr_factor,
        last_n_blocks=cfg.last_n_blocks))
    common = {"augment": DeviceAugment(cfg.augment_params(), device="cpu", seed=0),
              "optimizer": optimizer, "scaler": torch.amp.GradScaler("cuda", enabled=False),
              "weight_by_row": torch.ones(n, 1), "device": torch.device("cpu")}
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        train_epoch(model, loader, **common)
    return optimizer, store


def _cfg(**kw) -> TrialConfig:
    return TrialConfig(**{"arch": "resnet18", "weights": "imagenet", "image_size": 32,
                          "batch_size": 16, "lr": 1e-2, "augment": "none", "max_epochs": 3, **kw})


def _changed(before, after, prefix: str) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))


def test_head_trains_only_the_head_and_frozen_batchnorm_statistics_do_not_move():
    cfg = _cfg(finetune="head")
    torch.manual_seed(0)
    model = create_model("resnet18")
    set_trainable(model, "resnet18", backbone=False)
    before = _state(model)
    optimizer, _ = _train(model, cfg, epochs=2)
    after = _state(model)
    backbone = [k for k in before if not k.startswith("fc.")]
    # weights, biases and the BatchNorm running statistics and counters of the whole backbone
    assert all(torch.equal(before[k], after[k]) for k in backbone), [
        k for k in backbone if not torch.equal(before[k], after[k])][:5]
    assert any("running_mean" in k for k in backbone)
    assert _changed(before, after, "fc.")
    # Frozen parameters get no gradients and no optimiser state: only the head's 2 tensors.
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("fc."))
    assert len(optimizer.state) == 2 and len(optimizer.param_groups) == 1
    # Precise BatchNorm re-estimation leaves the frozen layers alone too.
    batches = [torch.rand(8, 3, 32, 32) for _ in range(2)]
    assert recompute_bn_stats(model, batches) == 0
    assert all(torch.equal(before[k], _state(model)[k]) for k in backbone)


def test_full_mode_moves_the_backbone_and_its_statistics():  # the control: the test above can fail
    cfg = _cfg(finetune="full")
    torch.manual_seed(0)
    model = create_model("resnet18")
    set_trainable(model, "resnet18", backbone=True)
    before = _state(model)
    optimizer, _ = _train(model, cfg)
    after = _state(model)
    assert _changed(before, after, "conv1.") and _changed(before, after, "bn1.running_mean")
    assert len(optimizer.state) == len(list(model.parameters()))


def test_last_n_blocks_trains_only_those_blocks_and_the_head():
    cfg = _cfg(finetune="full", last_n_blocks=1)
    torch.manual_seed(0)
    model = create_model("resnet18")
    set_trainable(model, "resnet18", backbone=True, last_n_blocks=1)
    before = _state(model)
    _train(model, cfg)
    after = _state(model)
    assert _changed(before, after, "layer4.") and _changed(before, after, "fc.")
    for frozen in ("conv1.", "bn1.", "layer1.", "layer2.", "layer3."):
        assert not _changed(before, after, frozen), frozen


def test_gradual_trains_the_head_first_then_the_backbone_at_a_lower_rate():
    cfg = _cfg(finetune="gradual", warmup_epochs=1, lr_schedule="plateau")
    assert cfg.backbone_lr_factor == 0.1
    assert [backbone_trains("gradual", e, 1) for e in (1, 2, 3)] == [False, True, True]
    torch.manual_seed(0)
    model = create_model("resnet18")
    groups = optimizer_groups(model, "resnet18", mode="gradual", lr=1e-2,
                              backbone_lr_mult=cfg.backbone_lr_factor)
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 1e-2), ("backbone", 1e-3)]
    set_trainable(model, "resnet18", backbone=False)
    before = _state(model)
    optimizer = make_optimizer(cfg, groups)
    _train_with(model, optimizer, cfg)
    mid = _state(model)
    assert not _changed(before, mid, "layer1.") and _changed(before, mid, "fc.")
    assert len(optimizer.state) == 2  # no state for the backbone while it is frozen
    set_trainable(model, "resnet18", backbone=True)
    _train_with(model, optimizer, cfg)
    assert _changed(mid, _state(model), "layer1.")
    assert len(optimizer.state) == len(list(model.parameters()))


def _train_with(model, optimizer, cfg):
    rng = np.random.default_rng(1)
    n = 32
    store = ArrayStore(rng.integers(0, 256, size=(n, 32, 32), dtype=np.uint8))
    labels = (rng.random((n, 1)) > 0.5).astype(np.float32)
    loader = BatchLoader(store, np.arange(n), labels, batch_size=16, shuffle=False)
    train_epoch(model, loader, augment=DeviceAugment(cfg.augment_params(), device="cpu", seed=0),
                optimizer=optimizer, scaler=torch.amp.GradScaler("cuda", enabled=False),
                weight_by_row=torch.ones(n, 1), device=torch.device("cpu"))


def test_frozen_batchnorm_stays_in_eval_mode_after_train():
    model = torchvision.models.resnet18(num_classes=1)
    model.fc = torch.nn.Sequential(torch.nn.Dropout(0.0), torch.nn.Linear(512, 1))
    set_trainable(model, "resnet18", backbone=True, last_n_blocks=2)
    model.train()
    assert freeze_batchnorm(model) == 1 + 4 + 5  # bn1; layer1: 2 x 2; layer2: 2 x 2 + downsample
    assert not model.bn1.training and not model.layer2[0].bn1.training
    assert model.layer3[0].bn1.training and model.layer4[1].bn2.training


@pytest.mark.parametrize("bad, match", [
    ({"finetune": "head", "weights": "none"}, "weights: none leaves it random"),
    ({"finetune": "frozen"}, "finetune"),
    ({"finetune": "head", "last_n_blocks": 2}, "does not apply to finetune: head"),
    ({"last_n_blocks": 5}, r"last_n_blocks must be in \[1, 4\] \(resnet18 has 4 blocks\), got 5"),
    ({"last_n_blocks": 0}, r"last_n_blocks must be in \[1, 4\]"),
    ({"finetune": "head", "backbone_lr_mult": 0.5}, "backbone_lr_mult does not apply to finetune: head"),
    ({"finetune": "gradual", "warmup_epochs": 3, "max_epochs": 3}, "1 <= warmup_epochs < max_epochs"),
    ({"finetune": "gradual", "warmup_epochs": 0}, "1 <= warmup_epochs < max_epochs"),
    ({"backbone_lr_mult": 0.0}, "backbone_lr_mult must be >="),
])
def test_bad_finetune_settings_are_refused_by_name(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrialConfig.from_dict({"arch": "resnet18", "weights": "imagenet", **bad})


def test_finetune_defaults_keep_todays_behaviour():
    cfg = TrialConfig()
    assert (cfg.finetune, cfg.last_n_blocks, cfg.backbone_lr_factor) == ("full", None, 1.0)
    model = create_model("resnet18")
    assert len(optimizer_groups(model, "resnet18", mode="full", lr=1e-4, backbone_lr_mult=1.0)
               ) == 2
    assert set_trainable(model, "resnet18", backbone=True) == sum(
        p.numel() for p in model.parameters())


def test_missing_demo_weights_say_how_to_stage_them(tmp_path):
    from raysearch.errors import WeightsError
    from raysearch.models.weights import resolve_weights_file

    with pytest.raises(WeightsError, match="raysearch weights stage-demo --arch resnet18"):
        resolve_weights_file(str(tmp_path / "demo_weights" / "resnet18.pt"), arch="resnet18",
                             cache_dir=None)


def test_a_relative_weights_path_in_a_space_is_taken_from_where_tune_runs(tmp_path, monkeypatch):
    """Trials run in another working directory: the path must be absolute before Ray starts,
    in `trial`, in a searched choice and in a point to evaluate alike."""
    from raysearch.search.space import parse_search_space

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    raw = {
        "name": "s", "data": {"root": "demo_data"},
        "search": {"num_samples": 2, "points_to_evaluate": [{"weights": "w/b.pt"}]},
        "scheduler": {"kind": "fifo", "max_epochs": 2, "grace_period": 1},
        "trial": {"arch": "resnet18", "weights": "w/a.pt", "finetune": "head"},
        "space": {"weights": {"choice": ["w/a.pt", "w/b.pt", "imagenet"]}},
    }
    spec = parse_search_space(raw)
    assert spec.trial["weights"] == str(tmp_path / "w" / "a.pt")
    assert spec.space[0].values == (str(tmp_path / "w" / "a.pt"), str(tmp_path / "w" / "b.pt"),
                                    "imagenet")
    assert spec.search.points_to_evaluate[0]["weights"] == str(tmp_path / "w" / "b.pt")


def test_bench_train_finetune_compares_a_frozen_arm_with_a_full_one():
    from raysearch.bench.step import bench_finetune

    r = bench_finetune(arch="resnet18", image_size=32, batch_size=8, mode="full",
                       last_n_blocks=1, steps=2, warmup=1, rounds=2, device="cpu")
    full = sum(p.numel() for p in create_model("resnet18").parameters())
    assert r["full_trainable"] == full
    layer4_and_head = sum(p.numel() for n, p in create_model("resnet18").named_parameters()
                          if n.startswith(("layer4.", "fc.")))
    assert r["mode_trainable"] == layer4_and_head
    assert r["full_images_per_s"] > 0 and r["mode_images_per_s"] > 0 and r["speedup"] > 0
    head = bench_finetune(arch="resnet18", image_size=32, batch_size=8, mode="head", steps=2,
                          warmup=1, rounds=1, device="cpu")
    assert head["mode_trainable"] == 512 + 1


@pytest.mark.parametrize("argv, line", [
    (["bench", "train", "--finetune", "full", "--last-n-blocks", "9"],
     "--last-n-blocks must be in [1, 4] (resnet18 has 4 blocks), got 9"),
    (["bench", "train", "--finetune", "head", "--last-n-blocks", "2"],
     "--last-n-blocks applies to `bench train --finetune full|gradual` only"),
    (["bench", "train", "--last-n-blocks", "2"],
     "--last-n-blocks applies to `bench train --finetune full|gradual` only"),
    (["bench", "step", "--finetune", "head"],
     "--finetune applies to `bench train` only, not `bench step`"),
    (["bench", "train", "--finetune", "head", "--rounds", "0"], "--rounds must be >= 1, got 0"),
    # every other option a bench does not read (they were ignored without a word)
    (["bench", "data", "--num-samples", "5"], ("--num-samples applies to bench search only, not "
     "`bench data`")),
    (["bench", "search", "--rounds", "3"], ("--rounds applies to bench data, step, train, train "
     "--finetune, predict, serve, explain only, not `bench search`")),
    (["bench", "train", "--finetune", "head", "--root", "d"], ("--root applies to bench data, "
     "train, search only, not `bench train --finetune`")),
    (["bench", "explain", "--ensemble", "e"], ("--ensemble applies to bench predict, serve only, "
     "not `bench explain`")),
    (["bench", "step", "--clients", "3"], "--clients applies to bench serve only, not `bench step`"),
    (["weights", "stage-demo", "--epochs", "0"], "--epochs must be >= 1, got 0"),
])
def test_bench_and_stage_demo_options_that_do_not_apply_are_refused(argv, line, capsys):
    from raysearch.cli import main

    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"raysearch: error: {line}"
