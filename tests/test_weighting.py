"""Class weighting: the formulas on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raysearch.errors import ConfigError, DataError
from raysearch.weighting import example_weights


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
