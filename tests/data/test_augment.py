"""Tests for batched on-device augmentation: determinism, exact fast paths, geometry, presets."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from raysearch.data import augment as A
from raysearch.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    AugmentParams,
    DeviceAugment,
    affine_theta,
    resolve_augment,
)
from raysearch.errors import ConfigError

CPU = torch.device("cpu")


def batch(b: int = 4, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (b, 1, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def plain_normalise(x: torch.Tensor) -> torch.Tensor:
    return TF.normalize((x.float() / 255.0).expand(-1, 3, -1, -1), IMAGENET_MEAN, IMAGENET_STD)


def one_bright_pixel(h: int, w: int, row: int, col: int) -> torch.Tensor:
    x = torch.zeros(1, 1, h, w)
    x[0, 0, row, col] = 1.0
    return x


def warp(x: torch.Tensor, **kw) -> torch.Tensor:
    b = x.shape[0]
    args = {
        "angle": torch.zeros(b),
        "hflip": torch.zeros(b, dtype=torch.bool),
        "scale": torch.ones(b),
        "shift": torch.zeros(b, 2),
    }
    args.update(kw)
    theta = affine_theta(**args, height=x.shape[-2], width=x.shape[-1])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def argmax_rc(img: torch.Tensor) -> tuple[int, int]:
    flat = int(img.reshape(-1).argmax())
    return divmod(flat, img.shape[-1])


# ----------------------------------------------------------------------------- DeviceAugment


def test_same_seed_same_output_and_different_seed_differs():
    x = batch()
    outs = [DeviceAugment(PRESETS["strong"], device=CPU, seed=s).train_batch(x) for s in (3, 3, 4)]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_output_is_float32_three_channels_of_the_input_size():
    x = batch(b=3, h=24, w=40)
    out = DeviceAugment(PRESETS["strong"], device=CPU, seed=0).train_batch(x)
    assert out.shape == (3, 3, 24, 40) and out.dtype == torch.float32
    # Clamped to [0, 1] before normalisation, per channel.
    for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):
        assert out[:, c].min() >= (0 - m) / s - 1e-5 and out[:, c].max() <= (1 - m) / s + 1e-5
    assert not torch.equal(out, plain_normalise(x))  # something was actually augmented


def test_none_is_exactly_plain_normalisation_and_never_warps(monkeypatch):
    def no_warp(*args, **kwargs):
        raise AssertionError("grid_sample must be skipped for an identity warp")

    monkeypatch.setattr(A.F, "grid_sample", no_warp)
    x = batch()
    aug = DeviceAugment(PRESETS["none"], device=CPU, seed=0)
    assert torch.equal(aug.train_batch(x), plain_normalise(x))
    assert torch.equal(aug.eval_batch(x), plain_normalise(x))
    assert torch.equal(aug.eval_batch(x, hflip=True), plain_normalise(x).flip(-1))


def test_flip_with_probability_one_equals_torch_flip(monkeypatch):
    monkeypatch.setattr(A.F, "grid_sample", None)  # a flip alone must not need a warp
    x = batch()
    out = DeviceAugment(AugmentParams(hflip=1.0), device=CPU, seed=0).train_batch(x)
    assert torch.equal(out, torch.flip(plain_normalise(x), dims=[-1]))


def test_flip_with_probability_half_flips_some_samples_whole():
    x = batch(b=32)
    out = DeviceAugment(AugmentParams(hflip=0.5), device=CPU, seed=1).train_batch(x)
    ref = plain_normalise(x)
    flipped = [torch.equal(o, r.flip(-1)) for o, r in zip(out, ref)]
    kept = [torch.equal(o, r) for o, r in zip(out, ref)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < 32


def test_rotation_keeps_a_bright_pixel_at_its_distance_from_the_centre():
    x = torch.zeros(8, 1, 33, 33, dtype=torch.uint8)
    x[:, 0, 16, 26] = 255  # 10 px right of the centre pixel (16, 16)
    out = DeviceAugment(AugmentParams(rotation=90.0), device=CPU, seed=5).train_batch(x)
    rows_cols = [argmax_rc(o[0]) for o in out]
    radii = [((r - 16) ** 2 + (c - 16) ** 2) ** 0.5 for r, c in rows_cols]
    assert all(abs(rad - 10) <= 1.5 for rad in radii)
    assert len(set(rows_cols)) > 1  # the angle is random per sample


def test_resume_from_state_dict_continues_the_same_stream():
    x1, x2 = batch(seed=1), batch(seed=2)
    first = DeviceAugment(PRESETS["strong"], device=CPU, seed=9)
    first.train_batch(x1)
    buf = io.BytesIO()
    torch.save({"augment": first.state_dict()}, buf)
    expected = first.train_batch(x2)

    buf.seek(0)
    resumed = DeviceAugment(PRESETS["strong"], device=CPU, seed=9)
    resumed.load_state_dict(torch.load(buf, weights_only=True)["augment"])
    assert torch.equal(resumed.train_batch(x2), expected)


def test_channels_last_changes_layout_not_values():
    x = batch()
    a = DeviceAugment(PRESETS["mura"], device=CPU, seed=2).train_batch(x)
    b = DeviceAugment(PRESETS["mura"], device=CPU, seed=2, channels_last=True).train_batch(x)
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)


def test_brightness_scales_each_sample_within_its_range():
    x = torch.full((16, 1, 8, 8), 100, dtype=torch.uint8)
    out = DeviceAugment(AugmentParams(brightness=0.2), device=CPU, seed=0).train_batch(x)
    unit = out[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # back to [0, 1]
    factors = unit.mean(dim=(1, 2)) / (100 / 255)
    assert torch.allclose(unit, unit[:, :1, :1].expand_as(unit), atol=1e-6)  # uniform per image
    assert factors.min() >= 0.8 - 1e-5 and factors.max() <= 1.2 + 1e-5
    assert factors.std() > 0.01


def test_a_batch_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        DeviceAugment(PRESETS["none"], device=CPU, seed=0).train_batch(torch.zeros(2, 32, 32))


# ----------------------------------------------------------------------------- geometry


def test_rotation_by_90_degrees_is_counter_clockwise_on_screen():
    x = one_bright_pixel(33, 33, 16, 26)  # right of centre
    out = warp(x, angle=torch.tensor([90.0]))
    assert argmax_rc(out[0, 0]) == (6, 16)  # above the centre (rows grow downwards)
    assert out[0, 0, 6, 16] > 0.99


def test_rotation_is_true_on_non_square_images():
    x = one_bright_pixel(33, 65, 16, 42)  # 10 px right of the centre (16, 32)
    out = warp(x, angle=torch.tensor([90.0]))
    assert argmax_rc(out[0, 0]) == (6, 32)


def test_zoom_and_shift_move_content_as_documented():
    x = one_bright_pixel(33, 33, 16, 21)  # 5 px right of centre
    assert argmax_rc(warp(x, scale=torch.tensor([2.0]))[0, 0]) == (16, 26)
    y = one_bright_pixel(32, 32, 10, 10)
    moved = warp(y, shift=torch.tensor([[0.25, -0.125]]))  # 8 px right, 4 px up
    assert argmax_rc(moved[0, 0]) == (6, 18) and moved[0, 0, 6, 18] > 0.99


# ----------------------------------------------------------------------------- presets


def test_presets_include_the_mura_paper_setting():
    assert set(PRESETS) == {"none", "light", "mura", "strong"}
    assert PRESETS["mura"] == AugmentParams(rotation=30.0, hflip=0.5)
    assert PRESETS["none"] == AugmentParams()


def test_resolve_augment_applies_overrides():
    p = resolve_augment("mura", rotation=10, scale_min=0.9)
    assert (p.rotation, p.hflip, p.scale_min, p.scale_max) == (10, 0.5, 0.9, 1.0)
    assert resolve_augment() == PRESETS["mura"]


def test_resolve_augment_errors_list_the_allowed_values():
    with pytest.raises(
        ConfigError, match="unknown augment preset 'heavy'; allowed: none, light, mura, strong"
    ):
        resolve_augment("heavy")
    with pytest.raises(
        ConfigError, match="unknown augment parameter 'rotate'; allowed: rotation, hflip"
    ):
        resolve_augment("mura", rotate=10)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hflip": 1.5}, r"hflip must be in \[0, 1\], got 1.5"),
        ({"rotation": -5}, "rotation must be in"),
        ({"scale_min": 1.2}, "scale_min <= scale_max"),
        ({"contrast": "high"}, "contrast must be a number, got 'high'"),
        ({"translate": float("nan")}, "translate must be finite"),
    ],
)
def test_bad_parameter_values_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_augment("none", **overrides)
