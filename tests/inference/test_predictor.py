"""Tests for the predictor (raysearch.inference): built from a folder alone, the same numbers
from the decode-once cache as from the raw files, arrays and bytes as input, studies by the
task's rule, and no Ray."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from raysearch.config import TrialConfig
from raysearch.data.cache import build_cache
from raysearch.data.dataset import Task
from raysearch.data.mura import MURA_TASK, read_mura
from raysearch.errors import ConfigError, DataError
from raysearch.experiment import TrialCheckpoint, update_info
from raysearch.inference.predictor import Predictor
from raysearch.models.factory import create_model


def _checkpoint(folder, *, arch="mobilenet_v3_small", image_size=48, seed=0, task=MURA_TASK):
    """A trial checkpoint as raysearch writes one: model.pt, trial.json, task.json."""
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    model = create_model(arch, num_labels=task.k).eval()
    torch.save(model.state_dict(), os.path.join(folder, "model.pt"))
    cfg = TrialConfig(arch=arch, weights="none", image_size=image_size)
    with open(os.path.join(folder, "trial.json"), "w") as f:
        json.dump(cfg.to_dict(), f)
    with open(os.path.join(folder, "task.json"), "w") as f:
        json.dump(task.to_dict(), f)
    return TrialCheckpoint(trial_id=f"t{seed}", checkpoint=str(folder), config=cfg, task=task)


@pytest.fixture(scope="module")
def tiny_manifest(tiny_root):
    return read_mura(tiny_root)


@pytest.fixture
def two_members(tmp_path):
    return [_checkpoint(tmp_path / "a", image_size=48, seed=0),
            _checkpoint(tmp_path / "b", arch="resnet18", image_size=32, seed=1)]

def two_member_ensemble(exp, *, column: str = "best_checkpoint") -> str:
    """An experiment folder ``exp`` holding an ensemble of two members (mobilenet_v3_small at
    48 px, resnet18 at 32 px, equal weights); returns the ensemble folder. ``column``: the
    name of members.parquet's checkpoint column (``checkpoint`` in files of earlier releases)."""
    a = _checkpoint(exp / "train-a" / "checkpoint_000001", seed=0, image_size=48)
    b = _checkpoint(exp / "train-b" / "checkpoint_000001", arch="resnet18", seed=1, image_size=32)
    update_info(str(exp), kind="search", task=MURA_TASK.to_dict())
    (exp / "ensemble").mkdir()
    pd.DataFrame({"trial_id": ["a", "b"], "weight": [0.5, 0.5],
                  column: [a.checkpoint, b.checkpoint]}).to_parquet(
        exp / "ensemble" / "members.parquet")
    return str(exp / "ensemble")


def test_the_cache_and_the_raw_files_give_the_same_probabilities(tmp_path, tiny_manifest,
                                                                   two_members):
    predictor = Predictor(two_members, weights=[3, 1], task=MURA_TASK, device="cpu")
    test = tiny_manifest[tiny_manifest["split"] == "test"].head(12)
    paths = test["image_path"].tolist()
    from_files = predictor.predict(paths)
    caches = {s: build_cache(tiny_manifest, image_size=s, cache_dir=str(tmp_path / "cache"),
                             progress=False) for s in (32, 48)}
    rows = caches[48].rows_for(paths)
    assert (caches[32].rows_for(paths) == rows).all()  # one manifest order for both sizes
    from_cache = predictor.predict_preprocessed({s: c.images for s, c in caches.items()},
                                                rows=rows)
    assert from_files.probs.shape == (12, 1)
    np.testing.assert_allclose(from_files.probs, from_cache.probs, rtol=0, atol=1e-6)
    for tid in ("t0", "t1"):
        np.testing.assert_allclose(from_files.members[tid], from_cache.members[tid], atol=1e-6)
    expected = 0.75 * from_files.members["t0"] + 0.25 * from_files.members["t1"]
    np.testing.assert_allclose(from_files.probs, expected, atol=1e-9)


def test_arrays_bytes_and_paths_are_the_same_image(tiny_manifest, two_members):
    predictor = Predictor(two_members[:1], task=MURA_TASK, device="cpu")
    path = tiny_manifest["image_path"].iloc[0]
    with open(path, "rb") as f:
        raw = f.read()
    with Image.open(io.BytesIO(raw)) as img:
        array = np.asarray(img)
    p = predictor.predict([path, raw, array]).probs
    assert p[0] == pytest.approx(p[1]) and p[0] == pytest.approx(p[2])


def test_an_unreadable_image_is_named(tmp_path, two_members):
    predictor = Predictor(two_members[:1], task=MURA_TASK, device="cpu")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png"):
        predictor.predict([str(bad)])
    with pytest.raises(DataError, match="image not found: .*missing.png"):
        predictor.predict([str(tmp_path / "missing.png")])


def test_studies_follow_the_tasks_rule(tiny_manifest, two_members):
    images = tiny_manifest[tiny_manifest["split"] == "test"].head(9)
    for task, reduce in ((MURA_TASK, "mean"), (Task(name="max", labels=("abnormal",),
                                                    group="body_part", aggregation="max"), "max")):
        predictor = Predictor(two_members, task=task, device="cpu")
        per_image, studies = predictor.predict_studies(images)
        expected = per_image.groupby("study_id")["prob"].agg(reduce)
        got = studies.set_index("study_id")["prob"]
        pd.testing.assert_series_equal(got, expected, check_names=False)
        assert set(studies.columns) >= {"study_id", "patient_id", "body_part", "n_images", "prob",
                                        "pred", "prob_t0", "prob_t1"}
        assert (studies["pred"] == (studies["prob"] > 0.5)).all()


def test_a_predictor_is_built_from_an_experiment_or_an_ensemble_folder(tmp_path):
    exp = tmp_path / "exp"
    a = _checkpoint(exp / "train-a" / "checkpoint_000001", seed=0)
    b = _checkpoint(exp / "train-b" / "checkpoint_000003", seed=1, image_size=32)
    update_info(str(exp), kind="search", task=MURA_TASK.to_dict())
    pd.DataFrame({
        "trial_id": ["a", "b"], "status": ["completed", "completed"], "best_val_loss": [0.4, 0.3],
        "best_checkpoint": ["train-a/checkpoint_000001", "train-b/checkpoint_000003"],
    }).to_parquet(exp / "trials.parquet")
    best = Predictor.from_dir(str(exp), device="cpu")
    assert [m.trial_id for m in best.members] == ["b"]  # the lowest val loss
    assert [m.trial_id for m in Predictor.from_dir(str(exp), top=2).members] == ["b", "a"]

    ensemble = exp / "ensemble"
    ensemble.mkdir()
    for column in ("best_checkpoint", "checkpoint"):  # this release's name, and the one before
        pd.DataFrame({"trial_id": ["a", "b"], "weight": [0.25, 0.75],
                      column: [a.checkpoint, b.checkpoint]}).to_parquet(
            ensemble / "members.parquet")
        for path in (exp, ensemble):
            predictor = Predictor.from_dir(str(path), device="cpu")
            assert predictor.weights == {"a": 0.25, "b": 0.75}
            assert predictor.task == MURA_TASK
    with pytest.raises(ConfigError, match="neither an ensemble folder"):
        Predictor.from_dir(str(tmp_path))


def test_importing_the_predictor_does_not_import_ray():
    code = ("import raysearch.inference, raysearch.inference.predictor, sys; "
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray.'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_no_images_give_empty_tables_of_the_right_shape(tiny_manifest, two_members):
    """An empty list or frame (every input filtered out upstream) gives [0, K] probabilities and
    empty image and study tables, not a [0, 0] array that breaks the indexing after it."""
    predictor = Predictor(two_members, task=MURA_TASK, device="cpu")
    pred = predictor.predict([])
    assert pred.probs.shape == (0, 1)
    assert {m.shape for m in pred.members.values()} == {(0, 1)}
    per_image, studies = predictor.predict_studies(tiny_manifest.head(0))
    assert len(per_image) == 0 and len(studies) == 0
    assert {"prob", "prob_t0", "prob_t1"} <= set(per_image.columns)


def test_a_bad_top_or_device_is_a_config_error_naming_it(tmp_path, two_members):
    """`exp.predictor(top=0)` gave the best trial alone without a word; `device="tpu"` was
    torch's RuntimeError listing twenty device types."""
    ensemble = two_member_ensemble(tmp_path / "exp")
    for top in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match=f"top must be an int >= 1, got {top!r}"):
            Predictor.from_dir(str(tmp_path / "exp"), top=top, device="cpu")
    with pytest.raises(ConfigError, match="device must be a torch device .*got 'tpu'"):
        Predictor.from_dir(ensemble, device="tpu")
    with pytest.raises(ConfigError, match="device must be a torch device"):
        Predictor(two_members, task=MURA_TASK, device="gpu")
