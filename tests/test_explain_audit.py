"""Tests for the shortcut audit (raysearch.explain.audit): the scores on known maps, the tables
it writes, real data without boxes, and (slow) that it flags a model trained on
`demo-data --shortcut 0.9` and not one trained on clean data with the same seed and budget."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest

from raysearch.data.mura import MURA_TASK, read_mura
from raysearch.explain.audit import _perturbed, _share, find_annotations, run_audit
from raysearch.inference.predictor import Predictor
from tests.inference.test_predictor import two_member_ensemble


def test_shares_and_deletion_masks_on_a_known_map():
    heat = np.zeros((10, 20), np.float32)
    heat[2:4, 5:9] = 3.0
    heat[8, 19] = 1.0
    box = np.zeros_like(heat, dtype=bool)
    box[2:4, 5:9] = True
    assert _share(heat, box) == pytest.approx(24 / 25)
    assert math.isnan(_share(np.zeros_like(heat), box))
    assert math.isnan(_share(heat, np.zeros_like(box)))
    gray = np.full((10, 20), 100, np.uint8)
    blurred = np.full((10, 20), 7, np.uint8)
    top, rand = _perturbed(gray, blurred, heat, k=0.05, rng=np.random.default_rng(0))
    assert (top == 7).sum() == 10 and (rand == 7).sum() == 10  # 5 % of 200 pixels each
    assert (top[2:4, 5:9] == 7).all() and top[8, 19] == 7  # the map's top pixels


def test_audit_writes_per_model_rows_with_and_without_boxes(tmp_path, tiny_root):
    ensemble = two_member_ensemble(tmp_path / "exp")
    predictor = Predictor.from_dir(ensemble, device="cpu")
    manifest = read_mura(tiny_root)
    manifest.attrs = {}  # the reader's skip list, which pd.concat cannot compare
    boxes = find_annotations(os.path.join(tiny_root, "MURA-v1.1"))
    abnormal_with_finding = set(boxes.loc[boxes["kind"] == "finding", "image_path"])
    test = manifest[manifest["split"] == "test"]
    picked = pd.concat([
        test[test["image_path"].map(lambda p: p[p.rfind("MURA-v1.1/"):] in abnormal_with_finding)
             & (test["label"] == 1)].head(2),
        test[test["label"] == 0].head(1)])
    out = str(tmp_path / "audit")
    summary = run_audit(predictor=predictor, images=picked, data_root=tiny_root, out=out,
                        method="gradcam")
    assert list(summary["model"]) == ["a", "b", "ensemble"]
    assert (summary["n_images"] == 3).all() and (summary["n_pointing"] == 2).all()
    for col in ("pointing_hit_rate", "finding_share"):
        assert summary[col].between(0, 1).all()
    assert (summary["flagged"] == (summary["marker_share"] > 0.01)).all()
    per_image = pd.read_parquet(os.path.join(out, "audit_images.parquet"))
    assert len(per_image) == 9
    pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(out, "audit.parquet")), summary)
    # Real data: no annotations.parquet, so only the deletion check has numbers.
    real = run_audit(predictor=predictor, images=picked.head(1), data_root=str(tmp_path),
                     out=str(tmp_path / "real"))
    assert real["finding_share"].isna().all() and real["pointing_hit_rate"].isna().all()
    assert real["deletion_drop"].notna().all() and not real["flagged"].any()


@pytest.mark.slow
def test_the_audit_flags_a_shortcut_model_and_not_a_clean_one(tmp_path, monkeypatch):
    """Two resnet18 trained on demo data with the same seed and budget, one where the L/R marker
    follows the label (`--shortcut 0.9`), one clean: the audit flags the first alone.

    Minutes on a 2-core CPU (plain-torch training loop, no Ray)."""
    from raysearch.data import synth
    from tests.explain_training import held_out_images, train_checkpoint

    monkeypatch.setitem(synth.DEMO_SIZES, "audit", synth.DemoSize(
        train_patients=150, valid_patients=40, min_side=64, max_side=89))
    summaries = {}
    for name, shortcut in (("clean", None), ("shortcut", 0.9)):
        root = str(tmp_path / name)
        synth.make_demo_data(root, size="audit", seed=0, shortcut=shortcut, num_workers=1)
        member = train_checkpoint(root, str(tmp_path / f"{name}_ck"), trial_id=name, epochs=8,
                                  image_size=64, lr=3e-3)
        predictor = Predictor([member], task=MURA_TASK, device="cpu")
        summaries[name] = run_audit(predictor=predictor, images=held_out_images(root),
                                    data_root=root, layer="layer3", max_images=40,
                                    out=str(tmp_path / f"{name}_audit")).set_index("model")
    clean, shortcut = summaries["clean"], summaries["shortcut"]
    assert shortcut.loc["shortcut", "flagged"] and shortcut.loc["ensemble", "flagged"]
    assert not clean.loc["clean", "flagged"] and not clean.loc["ensemble", "flagged"]
    assert shortcut.loc["shortcut", "marker_share"] > 2 * clean.loc["clean", "marker_share"]
