"""Tests for the synthetic ground truth (raysearch.data.synth): annotations.parquet beside the
data, and `demo-data --shortcut P`, which ties the L/R marker to the label."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raysearch.cli import main
from raysearch.errors import ConfigError


def _marker_rate(folder: str) -> pd.Series:
    """The share of images with a marker, by label (0, 1)."""
    boxes = pd.read_parquet(os.path.join(folder, "annotations.parquet"))
    root = os.path.join(folder, "MURA-v1.1")
    paths = []
    for split in ("train", "valid"):
        with open(os.path.join(root, f"{split}_image_paths.csv")) as f:
            paths += [line.strip() for line in f]
    marked = set(boxes.loc[boxes["kind"] == "marker", "image_path"])
    frame = pd.DataFrame({"label": ["positive" in p for p in paths],
                          "marker": [p in marked for p in paths]})
    return frame.groupby("label")["marker"].mean()


def test_annotations_hold_every_finding_and_marker_in_image_pixels(tiny_root):
    boxes = pd.read_parquet(os.path.join(tiny_root, "annotations.parquet"))
    assert list(boxes.columns) == ["image_path", "kind", "detail", "x0", "y0", "x1", "y1",
                                   "label"]
    assert set(boxes["kind"]) == {"finding", "marker"}
    assert set(boxes.loc[boxes["kind"] == "finding", "detail"]) <= {
        "hardware", "fracture", "lesion", "hairline", "small_lesion"}
    bright = 0
    for row in boxes.itertuples():
        with Image.open(os.path.join(tiny_root, row.image_path)) as img:
            a = np.asarray(img.convert("L"))
        assert 0 <= row.x0 < row.x1 <= a.shape[1] and 0 <= row.y0 < row.y1 <= a.shape[0]
        if row.kind == "marker":  # a white letter (anti-aliased: small ones peak near 210)
            inside = a[row.y0:row.y1, row.x0:row.x1]
            bright += inside.max() > 200 or inside.min() < 55  # 8 % of films are inverted
    assert bright == (boxes["kind"] == "marker").sum()
    rate = _marker_rate(tiny_root)
    assert abs(rate[True] - rate[False]) < 0.3  # clean data: markers independent of the label


def test_shortcut_ties_the_marker_to_the_label(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path), "--size", "tiny", "--shortcut", "0.9"]) == 0
    rate = _marker_rate(str(tmp_path))
    assert rate[True] > 0.85 and rate[False] < 0.1
    with pytest.raises(ConfigError, match=r"shortcut must be in \[0, 1\], got 1.5"):
        from raysearch.data.synth import make_demo_data

        make_demo_data(str(tmp_path / "x"), size="tiny", shortcut=1.5)
