"""Class weighting: the formulas on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raysearch.config import TrialConfig
from raysearch.errors import ConfigError, DataError
from raysearch.train.losses import example_weights, weighting_notes


@pytest.fixture
def train() -> pd.DataFrame:
    # WRIST: 3 studies (1 abnormal, 2 normal) -> N=2, A=1; HAND: 2 studies (both abnormal... and one normal)
    rows = [
        ("WRIST", "w1", 1), ("WRIST", "w1", 1),  # one abnormal study, two images
        ("WRIST", "w2", 0), ("WRIST", "w3", 0),
        ("HAND", "h1", 1), ("HAND", "h2", 0), ("HAND", "h2", 0), ("HAND", "h3", 0), ("HAND", "h4", 0),
    ]
    return pd.DataFrame(rows, columns=["body_part", "study_id", "label"])


def test_none(train):
    assert np.array_equal(example_weights(train, scheme="none"), np.ones(len(train), np.float32))


def test_mura_weights_per_body_part(train):
    w = example_weights(train, scheme="mura")
    # WRIST: N=2 normal, A=1 abnormal studies -> abnormal 2/3, normal 1/3.
    np.testing.assert_allclose(w[:4], [2 / 3, 2 / 3, 1 / 3, 1 / 3], rtol=1e-6)
    # HAND: N=3 normal (h2, h3, h4), A=1 -> abnormal 3/4, normal 1/4 (image counts do not matter).
    np.testing.assert_allclose(w[4:], [3 / 4, 1 / 4, 1 / 4, 1 / 4, 1 / 4], rtol=1e-6)


def test_inverse_with_and_without_bias(train):
    # P = 3 positive images, N = 6 negative images.
    w = example_weights(train, scheme="inverse")
    assert w[0] == pytest.approx(1 + 6 / 3) and w[2] == pytest.approx(1 + 3 / 6)
    w = example_weights(train, scheme="inverse", fp_bias=1.5)
    assert w[0] == pytest.approx(1 + (6 + 1.5) / 3) and w[2] == pytest.approx(1 + 3 / 6)


def test_balanced(train):
    w = example_weights(train, scheme="balanced")
    assert w[0] == pytest.approx(6 / 3) and w[2] == pytest.approx(1.0)


def test_errors(train):
    with pytest.raises(ConfigError, match="unknown value 'focal'"):
        example_weights(train, scheme="focal")
    with pytest.raises(DataError, match="needs both classes"):
        example_weights(train[train.label == 0], scheme="balanced")


def test_mura_body_part_with_one_class_uses_the_pooled_weights(train):
    # HUMERUS: two normal studies, no abnormal one; alone it would give its images weight 0.
    humerus = pd.DataFrame(
        [("HUMERUS", "u1", 0), ("HUMERUS", "u1", 0), ("HUMERUS", "u2", 0)],
        columns=["body_part", "study_id", "label"],
    )
    w = example_weights(pd.concat([train, humerus], ignore_index=True), scheme="mura")
    # Pooled over every part: A = 2 abnormal studies (w1, h1) and N = 7 normal ones (w2, w3,
    # h2, h3, h4, u1, u2): abnormal 7/9, normal 2/9.
    np.testing.assert_allclose(w[-3:], [2 / 9, 2 / 9, 2 / 9], rtol=1e-6)
    # The parts with both classes keep their own weights.
    np.testing.assert_allclose(w[:4], [2 / 3, 2 / 3, 1 / 3, 1 / 3], rtol=1e-6)
    assert (w > 0).all()
    notes = weighting_notes(pd.concat([train, humerus]), scheme="mura")
    assert notes == [
        (
            "class_weighting mura: HUMERUS has only normal studies in train (2); its images use "
            "the pooled weights (abnormal 0.78, normal 0.22)"
        )
    ]


def test_mura_on_the_tiny_demo_data_ignores_no_image(tiny_root):
    from raysearch.data.mura import read_mura

    manifest = read_mura(tiny_root, val_fraction=0.2, seed=0)
    train = manifest[manifest["split"] == "train"]
    w = example_weights(train, scheme="mura")
    assert w.dtype == np.float32 and w.shape == (len(train),)
    assert (w > 0).all()
    # The demo's FINGER and FOREARM have one (normal) study each in this split.
    notes = weighting_notes(train, scheme="mura")
    assert [n.split(":")[1].split(" has")[0].strip() for n in notes] == ["FINGER", "FOREARM"]
    assert weighting_notes(train, scheme="inverse") == []


def test_mura_needs_both_classes_in_the_whole_split(train):
    message = "'mura' needs both classes .* got 0 abnormal and 5 normal studies"
    with pytest.raises(DataError, match=message):
        example_weights(train[train.label == 0], scheme="mura")
    with pytest.raises(DataError, match="needs both classes"):
        weighting_notes(train[train.label == 1], scheme="mura")


def test_fp_bias_never_makes_a_weight_zero_or_negative(train):
    # P = 3, N = 6: a bias of -9 would give positives 1 + (6 - 9) / 3 = 0.
    for bad in (-9.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"fp_bias must be in \[0, 1e\+06\], got"):
            example_weights(train, scheme="inverse", fp_bias=bad)
        with pytest.raises(ConfigError, match=r"^fp_bias must be in \[0, 1e\+06\], got"):
            TrialConfig(fp_bias=bad)


def test_fp_bias_without_inverse_is_noted(train):
    assert weighting_notes(train, scheme="balanced", fp_bias=0.5) == [
        "class_weighting balanced: fp_bias 0.5 has no effect (only `inverse` uses it)"
    ]
    assert weighting_notes(train, scheme="inverse", fp_bias=0.5) == []
