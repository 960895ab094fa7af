"""Tests for the models stage: every architecture builds, and every weight source loads exactly."""

from __future__ import annotations

import io
import uuid
from urllib.error import URLError

import fsspec
import pytest
import torch
import torchvision
from torch import nn

from raysearch.errors import CheckpointError, ConfigError, WeightsError
from raysearch.models import factory as models
from raysearch.models import weights as weights_mod
from raysearch.models.factory import create_model
from raysearch.models.registry import ARCHITECTURES
from raysearch.models.weights import (
    fetch_weights,
    load_checkpoint_weights,
    load_weights_file,
    torchvision_weights_info,
)

HEADS = {"resnet18": "fc.", "mobilenet_v3_small": "classifier.3.", "densenet121": "classifier."}


def staged_state(arch: str, seed: int = 7) -> dict[str, torch.Tensor]:
    """A torchvision (1000-class) state dict with every float tensor set to seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    state = torchvision.models.get_model(arch, weights=None).state_dict()
    return {
        k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }


def assert_backbone_equals(model: nn.Module, staged: dict[str, torch.Tensor], head: str) -> None:
    own = model.state_dict()
    backbone = [k for k in own if not k.startswith(head)]
    assert backbone and all(k in staged for k in backbone)
    for k in backbone:
        assert torch.equal(own[k], staged[k]), k
    # The ImageNet head was dropped and a fresh single-logit head put in its place.
    head_module = model.get_submodule(head.rstrip("."))
    assert isinstance(head_module, nn.Sequential)
    assert head_module[1].out_features == 1


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub directory; downloads fail loudly unless a test replaces the downloader."""
    d = tmp_path / "torch_home" / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(d))

    def no_network(url, dst):
        raise URLError("network is unreachable (test)")

    monkeypatch.setattr(weights_mod, "_download_url", no_network)
    return d


# ----------------------------------------------------------------------------- the factory


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_builds_with_a_single_logit_head(arch):
    model = create_model(arch, weights="none", dropout=0.2).eval()
    heads = [
        m
        for m in model.modules()
        if isinstance(m, nn.Sequential)
        and len(m) == 2
        and isinstance(m[0], nn.Dropout)
        and isinstance(m[1], nn.Linear)
    ]
    assert len(heads) == 1 and heads[0][1].out_features == 1 and heads[0][0].p == 0.2
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 1) and torch.isfinite(out).all()


def test_unknown_arch_lists_the_valid_names():
    with pytest.raises(ConfigError, match="unknown arch 'densenet999'.*densenet169.*resnet18"):
        create_model("densenet999")


def test_dropout_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="dropout"):
        create_model("resnet18", dropout=1.0)


def test_torchvision_weights_info_names_the_hub_file():
    url, filename = torchvision_weights_info("resnet18")
    assert filename == "resnet18-f37072fd.pth" and url.endswith("/" + filename)


# ----------------------------------------------------------------------------- weight sources


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model_with_module_prefix"])
def test_local_file_loads_the_staged_tensors(tmp_path, wrap):
    staged = staged_state("resnet18")
    obj = {
        "plain": staged,
        "state_dict": {"state_dict": staged, "epoch": 3},
        "model_with_module_prefix": {"model": {f"module.{k}": v for k, v in staged.items()}},
    }[wrap]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    model = create_model("resnet18", weights=str(path), dropout=0.1)
    assert_backbone_equals(model, staged, HEADS["resnet18"])


@pytest.mark.parametrize(
    "prefix",
    ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.", "module.module._orig_mod."],
)
def test_wrapper_prefixes_are_stripped_in_any_order_and_nesting(tmp_path, prefix):
    # torch.compile of a DDP model saves _orig_mod.module.<key>; DDP of a compiled one the reverse.
    staged = staged_state("resnet18")
    path = tmp_path / "w.pth"
    torch.save({f"{prefix}{k}": v for k, v in staged.items()}, path)
    assert_backbone_equals(create_model("resnet18", weights=str(path)), staged, HEADS["resnet18"])
    trained = create_model("resnet18").state_dict()
    model = create_model("resnet18")
    load_checkpoint_weights(model, {f"{prefix}{k}": v for k, v in trained.items()},
                            arch="resnet18", source="model.pt")  # fmt: skip
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())


@pytest.mark.parametrize(
    "layout",
    [
        lambda sd: {"epoch": 5, "model_state_dict": sd, "loss": 0.3,
                    "optimizer_state_dict": {"state": {}, "param_groups": [{"params": [0]}]}},
        lambda sd: {"net": sd, "epoch": 1},
        lambda sd: {"model_state": sd},
        lambda sd: {"model": {"state_dict": sd}, "args": {"lr": 0.1}},
        lambda sd: {"state_dict": {f"_orig_mod.module.{k}": v for k, v in sd.items()}},
        lambda sd: {"module": sd, "global_steps": 120, "dp_world_size": 2},
    ],
    ids=["general-checkpoint", "net", "model_state", "nested", "lightning-compiled-ddp",
         "deepspeed"],
)  # fmt: skip
def test_general_checkpoint_layouts_are_recognised(tmp_path, layout):
    staged = staged_state("resnet18")
    path = tmp_path / "ckpt.pt"
    torch.save(layout(staged), path)
    assert_backbone_equals(create_model("resnet18", weights=str(path)), staged, HEADS["resnet18"])


def test_a_checkpoint_without_a_state_dict_names_the_keys_it_holds(tmp_path):
    path = tmp_path / "opt.pt"
    torch.save({"epoch": 5, "optimizer_state_dict": {"state": {}, "param_groups": []},
                "loss": 0.25}, path)  # fmt: skip
    with pytest.raises(WeightsError) as info:
        create_model("resnet18", weights=str(path))
    text = str(info.value)
    assert text.startswith(f"weights file {path}: not a state dict: it holds a dict with keys "
                           "epoch, optimizer_state_dict, loss and no state dict under any of "
                           "state_dict, model_state_dict, model,"), text  # fmt: skip
    with pytest.raises(CheckpointError, match=r"^x: not a state dict: it holds a dict with keys "
                                              r"epoch, optimizer_state_dict, loss and"):  # fmt: skip
        load_checkpoint_weights(create_model("resnet18"), torch.load(path, weights_only=True),
                                arch="resnet18", source="x")  # fmt: skip


def test_memory_url_is_downloaded_once_into_the_local_cache(tmp_path):
    staged = staged_state("mobilenet_v3_small")
    url = f"memory://weights-{uuid.uuid4().hex[:8]}/mnv3.pth"
    buf = io.BytesIO()
    torch.save(staged, buf)
    fs = fsspec.filesystem("memory")
    fs.pipe(url.removeprefix("memory://"), buf.getvalue())

    model = create_model("mobilenet_v3_small", weights=url, cache_dir=str(tmp_path))
    assert_backbone_equals(model, staged, HEADS["mobilenet_v3_small"])
    cached = list((tmp_path / "weights").glob("*/mnv3.pth"))
    assert len(cached) == 1

    fs.rm(url.removeprefix("memory://"))  # the second load must come from the node cache
    again = load_weights_file(url, arch="mobilenet_v3_small", cache_dir=str(tmp_path))
    assert all(torch.equal(again[k], staged[k]) for k in staged)


def test_imagenet_is_read_from_the_torch_hub_cache(hub_dir):
    staged = staged_state("resnet18")
    _, filename = torchvision_weights_info("resnet18")
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(staged, hub_dir / "checkpoints" / filename)
    model = create_model("resnet18", weights="imagenet")
    assert_backbone_equals(model, staged, HEADS["resnet18"])


def test_imagenet_is_downloaded_into_the_hub_cache_when_missing(hub_dir, monkeypatch):
    staged = staged_state("mobilenet_v3_small")
    calls = []

    def fake_download(url, dst):
        calls.append((url, dst))
        torch.save(staged, dst)

    monkeypatch.setattr(weights_mod, "_download_url", fake_download)
    url, filename = torchvision_weights_info("mobilenet_v3_small")
    for _ in range(2):
        model = create_model("mobilenet_v3_small", weights="imagenet")
        assert_backbone_equals(model, staged, HEADS["mobilenet_v3_small"])
    assert calls == [(url, str(hub_dir / "checkpoints" / filename))]


def test_offline_imagenet_with_empty_cache_explains_how_to_stage(hub_dir):
    _, filename = torchvision_weights_info("densenet169")
    with pytest.raises(WeightsError) as info:
        create_model("densenet169", weights="imagenet")
    msg = str(info.value)
    assert "\n" not in msg
    assert "densenet169" in msg and str(hub_dir / "checkpoints" / filename) in msg
    assert "raysearch weights fetch densenet169 --to gs://" in msg and "URLError" in msg


@pytest.mark.parametrize("with_counters", [False, True])
def test_densenet_old_key_names_are_remapped(tmp_path, with_counters):
    staged = staged_state("densenet121")
    if not with_counters:  # torchvision's real file predates BatchNorm's num_batches_tracked
        staged = {k: v for k, v in staged.items() if not k.endswith("num_batches_tracked")}
    old_style = {
        k.replace(".norm1.", ".norm.1.")
        .replace(".conv1.", ".conv.1.")
        .replace(".norm2.", ".norm.2.")
        .replace(".conv2.", ".conv.2."): v
        for k, v in staged.items()
    }
    assert any(".norm.1." in k for k in old_style)
    path = tmp_path / "densenet121-old.pth"
    torch.save(old_style, path)
    model = create_model("densenet121", weights=str(path))
    if not with_counters:
        staged = {**model.state_dict(), **staged}  # BatchNorm filled its own counters
    assert_backbone_equals(model, staged, HEADS["densenet121"])


def test_a_trained_single_logit_checkpoint_round_trips_including_the_head(tmp_path):
    trained = create_model("resnet18", dropout=0.3)
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    loaded = create_model("resnet18", weights=str(path), dropout=0.3)
    own = loaded.state_dict()
    assert all(torch.equal(own[k], v) for k, v in trained.state_dict().items())


def test_fetch_weights_stages_the_hub_file_into_a_bucket(hub_dir):
    staged = staged_state("mobilenet_v3_small")
    _, filename = torchvision_weights_info("mobilenet_v3_small")
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(staged, hub_dir / "checkpoints" / filename)
    prefix = f"memory://bucket-{uuid.uuid4().hex[:8]}/weights"

    uri = fetch_weights("mobilenet_v3_small", to=prefix)
    assert uri == f"{prefix}/{filename}"
    fs = fsspec.filesystem("memory")
    assert (
        fs.cat(uri.removeprefix("memory://")) == (hub_dir / "checkpoints" / filename).read_bytes()
    )
    full = fetch_weights("mobilenet_v3_small", to=f"{prefix}/renamed.pth")
    assert full.endswith("/renamed.pth") and fs.exists(full.removeprefix("memory://"))


def test_fetch_weights_offline_with_empty_cache_fails_clearly(hub_dir):
    with pytest.raises(WeightsError, match="no ImageNet weights for resnet18"):
        fetch_weights("resnet18", to="memory://nowhere/weights")


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kind", ["pickled_module", "list", "garbage", "non_tensor_values"])
def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "pickled_module":
        torch.save(nn.Linear(2, 2), path)  # needs full unpickling: refused by weights_only
    elif kind == "list":
        torch.save([torch.zeros(2)], path)
    elif kind == "garbage":
        path.write_bytes(b"this is not a checkpoint" * 10)
    else:
        torch.save({"conv1.weight": "nope"}, path)
    with pytest.raises(WeightsError, match=str(path)):
        create_model("resnet18", weights=str(path))


def test_a_backbone_shape_mismatch_is_refused(tmp_path):
    staged = staged_state("resnet18")
    staged["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    path = tmp_path / "bad.pth"
    torch.save(staged, path)
    with pytest.raises(WeightsError, match=r"shape mismatch in layer1\.0\.conv1\.weight"):
        create_model("resnet18", weights=str(path))


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "mnv3.pth"
    torch.save(staged_state("mobilenet_v3_small"), path)
    with pytest.raises(WeightsError, match=f"{path}.*unexpected keys features"):
        create_model("resnet18", weights=str(path))


def test_missing_backbone_keys_are_refused(tmp_path):
    staged = staged_state("resnet18")
    del staged["layer4.1.bn2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(staged, path)
    with pytest.raises(WeightsError, match=r"missing keys layer4\.1\.bn2\.weight"):
        create_model("resnet18", weights=str(path))


def test_missing_sources_name_themselves(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found: .*nope.pth"):
        create_model("resnet18", weights=str(tmp_path / "nope.pth"))
    url = f"memory://missing-{uuid.uuid4().hex[:8]}/w.pth"
    with pytest.raises(WeightsError, match=f"weights file not found: {url}"):
        create_model("resnet18", weights=url, cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="none"):
        load_weights_file("none", arch="resnet18")


def test_an_unwritable_cache_or_unknown_protocol_fails_in_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(WeightsError, match="cannot write the weights cache"):
        create_model("resnet18", weights="memory://x/w.pth", cache_dir=str(blocker))
    with pytest.raises(WeightsError, match="could not download weights nosuchproto://b/w.pth"):
        create_model("resnet18", weights="nosuchproto://b/w.pth", cache_dir=str(tmp_path))


def test_batchnorm_momentum_is_standardised():
    # torchvision's MobileNetV3 ships momentum 0.01; fine-tuning needs stats that follow the data.
    model = create_model("mobilenet_v3_small", weights="none")
    momenta = {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.1}


# ----------------------------------------------------------------------------- precise BN


def _bn_net() -> nn.Sequential:
    # Dropout *before* a BatchNorm: if dropout ran during re-estimation, the statistics would
    # be those of randomly zeroed inputs.
    return nn.Sequential(nn.Dropout(0.5), nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(),
                         nn.Linear(4, 1))


def test_precise_bn_statistics_are_the_average_over_the_batches():
    from raysearch.models.factory import recompute_bn_stats

    torch.manual_seed(0)
    net = _bn_net()
    bn = net[2]
    bn.running_mean.fill_(50.0)  # stale statistics, far from the data's
    bn.running_var.fill_(9.0)
    net.train()
    batches = [torch.randn(16, 3) * 3 + 1 for _ in range(5)]
    assert recompute_bn_stats(net, batches) == 5
    with torch.no_grad():
        feats = [net[1](b) for b in batches]  # what the BatchNorm sees, no dropout
    expected_mean = torch.stack([f.mean(0) for f in feats]).mean(0)
    expected_var = torch.stack([f.var(0, unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    # Modes and momentum are as they were.
    assert net.training and all(m.training for m in net.modules())
    assert bn.momentum == models.BN_MOMENTUM
    net.eval()
    recompute_bn_stats(net, batches)
    assert not any(m.training for m in net.modules())


def test_precise_bn_fixes_eval_predictions_after_a_big_step():
    """Stale running statistics make eval-mode outputs far from train-mode ones; after
    re-estimation on the same data they agree."""
    from raysearch.models.factory import recompute_bn_stats

    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].weight.mul_(20).add_(5)  # the "weights moved fast" case: stats now lag far behind
    x = torch.randn(256, 3)
    net.train()
    with torch.no_grad():
        train_mode = net(x)
    net.eval()
    with torch.no_grad():
        stale = net(x)
    recompute_bn_stats(net, [x[:128], x[128:]])
    with torch.no_grad():
        precise = net(x)
    assert (stale - train_mode).abs().mean() > 10 * (precise - train_mode).abs().mean()


def test_precise_bn_leaves_models_without_batchnorm_or_batches_alone():
    from raysearch.models.factory import recompute_bn_stats

    no_bn = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    bn = _bn_net()
    bn[2].running_mean.fill_(3.0)
    for net, batches in ((no_bn, [torch.randn(4, 3)]), (bn, [])):
        before = {k: v.clone() for k, v in net.state_dict().items()}
        assert recompute_bn_stats(net, batches) == 0
        for k, v in net.state_dict().items():
            torch.testing.assert_close(v, before[k])


# ----------------------------------------------------------------------------- trained checkpoints


def test_a_trained_checkpoint_loads_strictly_and_exactly():
    trained = create_model("resnet18", dropout=0.2)
    model = create_model("resnet18", dropout=0.2)
    load_checkpoint_weights(model, trained.state_dict(), arch="resnet18", source="model.pt")
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in trained.state_dict().items())


def test_a_checkpoint_of_another_architecture_names_the_file_arch_and_keys():
    state = create_model("resnet18").state_dict()
    source = "trial t1: model.pt in /exp/train-t1/checkpoint_000002"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_weights(
            create_model("mobilenet_v3_small"), state, arch="mobilenet_v3_small", source=source
        )
    text = str(info.value)
    assert text.startswith(
        f"{source}: the weights do not fit mobilenet_v3_small: missing keys features.0.0.weight, "
        "features.0.1.weight, features.0.1.bias (+"
    ), text
    assert "; unexpected keys conv1.weight, bn1.weight, bn1.bias (+" in text and "\n" not in text


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: s.pop("fc.1.bias"), r": the weights do not fit resnet18: missing keys fc\.1\.bias$"),
        (lambda s: s.update(extra=torch.zeros(1)), r": the weights do not fit resnet18: unexpected keys extra$"),
        (lambda s: s.update({"fc.1.weight": torch.zeros(2, 512)}),
         r": the weights do not fit resnet18: shape mismatch in fc\.1\.weight \(2, 512\) != \(1, 512\)$"),
        (lambda s: s.update({"fc.1.weight": "nope"}), r": not a state dict: entries fc\.1\.weight"),
    ],
    ids=["missing-head", "unexpected", "head-shape", "not-tensor"],
)  # fmt: skip
def test_a_checkpoint_must_fit_exactly_head_included(damage, message):
    # A trained head is part of the model: unlike ImageNet weights, it is never dropped.
    state = create_model("resnet18").state_dict()
    damage(state)
    with pytest.raises(CheckpointError, match="^model.pt in /ckpt" + message):
        load_checkpoint_weights(
            create_model("resnet18"), state, arch="resnet18", source="model.pt in /ckpt"
        )
    with pytest.raises(CheckpointError, match=r"^x: holds a list, not a state dict$"):
        load_checkpoint_weights(create_model("resnet18"), [1], arch="resnet18", source="x")
