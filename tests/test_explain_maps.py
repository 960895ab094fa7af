"""Tests for the per-member maps (raysearch.explain.maps) and the original frame and ensemble map
(raysearch.explain.frame): unnormalised, an explicit class, DenseNet's in-place ReLU, hooks
released, the letterbox undone."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from raysearch.data.dataset import Task
from raysearch.data.images import letterbox
from raysearch.data.mura import MURA_TASK
from raysearch.errors import ConfigError
from raysearch.explain.frame import ensemble_map, to_original
from raysearch.explain.maps import ExplainedNet, _protect, member_maps, resolve_target
from raysearch.models.factory import create_model

ABNORMAL = resolve_target(MURA_TASK, None)
NORMAL = resolve_target(MURA_TASK, "normal")


def _net(arch: str, seed: int = 0) -> ExplainedNet:
    torch.manual_seed(seed)
    return ExplainedNet(create_model(arch).eval(), arch)


def _x(size: int = 64, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_gradcam_is_unnormalised_and_equals_cam_over_the_cells_for_a_pooled_linear_head():
    net = _net("resnet18")
    x = _x(96)
    grad = member_maps(net, x, method="gradcam", target=ABNORMAL)
    cam = member_maps(net, x, method="cam", target=ABNORMAL)
    cells = grad.maps.shape[1] * grad.maps.shape[2]
    assert grad.maps.shape == (2, 3, 3)
    # d logit / d A = w / (h w) for global average pooling + linear (Selvaraju et al. 2017, sec 3.1)
    np.testing.assert_allclose(grad.maps * cells, cam.maps, rtol=1e-4, atol=1e-6)
    # Not min-max scaled: doubling the head doubles the map (the library would return 1.0 peaks).
    with torch.no_grad():
        net.head().weight.mul_(2)
    doubled = member_maps(net, x, method="gradcam", target=ABNORMAL)
    np.testing.assert_allclose(doubled.maps, 2 * grad.maps, rtol=1e-4, atol=1e-7)
    assert grad.maps.max() != pytest.approx(1.0)


def test_normal_explains_the_negated_logit():
    net = _net("resnet18", seed=3)
    x = _x(64, n=3, seed=1)
    abnormal = member_maps(net, x, method="cam", target=ABNORMAL)
    normal = member_maps(net, x, method="cam", target=NORMAL)
    np.testing.assert_array_equal(abnormal.logits, normal.logits)
    # The positive parts of +s and -s: disjoint supports that add up to |s|.
    assert (abnormal.maps * normal.maps == 0).all()
    assert (abnormal.maps + normal.maps).sum() > 0
    bias = float(net.head().bias[0].detach())
    signed = (abnormal.maps - normal.maps).mean(axis=(1, 2)) + bias
    np.testing.assert_allclose(signed, abnormal.logits[:, 0], rtol=1e-4, atol=1e-5)


def test_labels_are_explicit_and_normal_is_refused_where_meaningless():
    assert (ABNORMAL.label, ABNORMAL.sign) == ("abnormal", 1.0)
    assert (NORMAL.label, NORMAL.index, NORMAL.sign) == ("normal", 0, -1.0)
    two = Task(name="chest", labels=("effusion", "edema"), group="view")
    assert resolve_target(two, "edema").index == 1
    with pytest.raises(ConfigError, match="normal is meaningless for task 'chest'"):
        resolve_target(two, "normal")
    with pytest.raises(ConfigError, match="unknown --label 'fracture'.*allowed: abnormal, normal"):
        resolve_target(MURA_TASK, "fracture")


def test_densenet_is_explained_after_its_final_relu_and_the_hooked_tensor_is_protected():
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

    net = _net("densenet121")
    x = _x(64, n=1)
    # CAM at the registered layer (after the final ReLU): its mean plus the bias is the logit,
    # which holds only for the very tensor that global average pooling reads.
    abnormal = member_maps(net, x, method="cam", target=ABNORMAL)
    normal = member_maps(net, x, method="cam", target=NORMAL)
    bias = float(net.head().bias[0].detach())
    got = (abnormal.maps - normal.maps).mean() + bias
    assert got == pytest.approx(float(abnormal.logits[0, 0]), rel=1e-4, abs=1e-5)
    # The CPU pitfall: grad-cam keeps norm5's output as a CPU view that torchvision's in-place
    # ReLU then overwrites; the clone hook keeps the true (signed) norm5 output.
    norm5 = net.layer("features.norm5")
    with torch.no_grad():
        truth = norm5(net.net.features[:-1](x))
    assert truth.min() < 0
    for protect in (False, True):
        hooks = ActivationsAndGradients(net.net, [norm5], None)
        guard = norm5.register_forward_hook(_protect) if protect else None
        try:
            with torch.no_grad():
                net.net(x)
            kept = hooks.activations[0]
        finally:
            hooks.release()
            if guard is not None:
                guard.remove()
        if protect:
            torch.testing.assert_close(kept, truth)
        else:
            assert kept.min() >= 0  # the bug this guards against (on the CPU)


def test_an_earlier_layer_gives_a_finer_map_at_the_same_input_size():
    net = _net("resnet18")
    x = _x(64, n=1)
    assert member_maps(net, x, method="gradcam", target=ABNORMAL).maps.shape == (1, 2, 2)
    assert member_maps(net, x, method="gradcam", target=ABNORMAL,
                       layer="layer3").maps.shape == (1, 4, 4)
    with pytest.raises(ConfigError, match="resnet18 has no layer 'layer9'"):
        member_maps(net, x, method="gradcam", target=ABNORMAL, layer="layer9")
    with pytest.raises(ConfigError, match="--method cam needs"):
        member_maps(net, x, method="cam", target=ABNORMAL, layer="layer3")
    with pytest.raises(ConfigError, match="--method cam needs.*mobilenet_v3_small: has none"):
        member_maps(_net("mobilenet_v3_small"), x, method="cam", target=ABNORMAL)


def test_hooks_are_released_and_memory_does_not_grow_over_200_explanations():
    net = _net("resnet18")
    x = _x(32, n=1)

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
                   for m in net.modules())

    methods = ("gradcam", "hirescam", "gradcam++", "cam")
    for i in range(20):  # warm-up: allocator and caches settle
        member_maps(net, x, method=methods[i % 4], target=ABNORMAL)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(200):
        member_maps(net, x, method=methods[i % 4], target=ABNORMAL)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert hooks() == 0
    assert all(p.grad is None for p in net.parameters())
    assert grown < 256 * 1024, f"{grown} bytes kept over 200 explanations"
    # An error inside still releases the hooks.
    with pytest.raises(RuntimeError):
        member_maps(net, torch.zeros(1, 5, 32, 32), method="gradcam", target=ABNORMAL)
    assert hooks() == 0


def test_the_letterbox_and_resize_are_undone():
    width, height = 90, 50
    img = np.zeros((height, width), np.uint8)
    img[8:14, 70:78] = 255  # a bright spot near the top right, centred at (73.5, 10.5)
    square = letterbox(Image.fromarray(img), image_size=24).astype(np.float32)
    back = to_original(square, width=width, height=height)
    assert back.shape == (height, width)
    y, x = np.unravel_index(np.argmax(back), back.shape)
    assert abs(x - 73.5) <= 3 and abs(y - 10.5) <= 3
    assert back[:, :40].max() < 0.05 * back.max()  # nothing leaks from the padding


def test_the_ensemble_map_weights_members_by_weight_times_sensitivity_and_normalises_once():
    a = np.zeros((4, 4), np.float32)
    a[0, 0] = 10.0
    b = np.zeros((4, 4), np.float32)
    b[3, 3] = 1.0
    # Member b: weight 0.5, p = 0.5 (sensitivity 0.25): 0.125. Member a: p = 0.999: 0.004995.
    m = ensemble_map([a, b], weights=[0.5, 0.5], probs=[0.999, 0.5])
    assert m.max() == pytest.approx(1.0)
    assert m[3, 3] == pytest.approx(1.0)
    assert m[0, 0] == pytest.approx(10 * 0.5 * 0.999 * 0.001 / 0.125, rel=1e-4)
    assert ensemble_map([np.zeros((2, 2))], weights=[1], probs=[0.5]).max() == 0


def test_binary_relevance_members_are_refused_by_name():
    from types import SimpleNamespace

    from raysearch.config import TrialConfig
    from raysearch.data.mura import MURA_TASK
    from raysearch.errors import ConfigError
    from raysearch.explain.explainer import Explainer

    member = SimpleNamespace(trial_id="t1", config=TrialConfig(
        arch="resnet18", weights="none", binary_relevance=True))
    with pytest.raises(ConfigError, match="member t1: explain does not support binary relevance"):
        Explainer(SimpleNamespace(members=[member], task=MURA_TASK))
