"""End to end from a CSV manifest of one's own (`data.format: csv`): images of any layout, a
patient column, two labels, no official split -> a tiny search -> the ensemble -> the predictor."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

SPACE = """
name: mine
data: {{root: {root}, format: csv, val_fraction: 0.2, test_fraction: 0.2, seed: 0,
        labels: [abnormal, upper_limb]}}
resources: {{workers_per_trial: 1, max_concurrent: 2, max_failures: 0}}
search: {{algorithm: tpe, seed: 0, num_samples: 2, points_to_evaluate: [{{lr: 0.003}}]}}
scheduler: {{kind: fifo, max_epochs: 1, grace_period: 1}}
storage: {storage}
trial: {{weights: none, batch_size: 16, augment: none, image_size: 32, arch: mobilenet_v3_small,
         precise_bn_images: 32}}
space:
  lr: {{choice: [0.003, 0.001]}}
"""


@pytest.mark.slow
def test_a_csv_manifest_trains_searches_and_ensembles(tmp_path, tiny_root, ray_session):
    from raysearch.data.mura import read_mura
    from raysearch.ensemble.run import run_ensemble
    from raysearch.inference.predictor import Predictor
    from raysearch.search.space import load_search_space
    from raysearch.search.tune import run_search

    # A manifest of one's own: the tiny demo's images under other names, relative paths, a
    # second label where a few values are unknown (-1 / empty).
    mura = read_mura(tiny_root, val_fraction=0.2, seed=0)
    rng = np.random.default_rng(0)
    upper = mura["body_part"].isin(["SHOULDER", "HUMERUS"]).astype(int).astype(str)
    unknown = rng.random(len(mura)) < 0.1
    upper[unknown] = np.where(rng.random(unknown.sum()) < 0.5, "-1", "")
    # one study, one set of labels: the unknown values follow the study's first image
    frame = pd.DataFrame({
        "image": [os.path.relpath(p, tmp_path) for p in mura["image_path"]],
        "patient": "pt-" + mura["patient_id"].astype(str), "study": mura["study_id"],
        "group": mura["body_part"], "abnormal": mura["label"].astype(str), "upper_limb": upper,
    })
    frame["upper_limb"] = frame.groupby("study")["upper_limb"].transform("first")
    manifest = tmp_path / "mine.csv"
    frame.to_csv(manifest, index=False)

    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(root=manifest, storage=tmp_path / "reports"))
    console = Console(file=io.StringIO(), width=120)
    exp = run_search(load_search_space(str(space)), console=console)
    trials = pd.read_parquet(os.path.join(exp, "trials.parquet"))
    assert len(trials) == 2 and (trials["status"] == "completed").all()
    saved = pd.read_parquet(os.path.join(exp, "manifest.parquet"))
    assert set(saved["split"]) == {"train", "val", "test"}
    assert (saved.groupby("patient_id")["split"].nunique() == 1).all()
    assert saved["label_upper_limb"].isna().any() and saved["label_abnormal"].notna().all()

    out = run_ensemble(experiment=exp, top=2, n_boot=20, console=console)
    studies = pd.read_parquet(os.path.join(out, "study_predictions.parquet"))
    assert set(studies["label_name"]) == {"abnormal", "upper_limb"}
    test = saved[saved["split"] == "test"]
    _, again = Predictor.from_dir(out).predict_studies(test)
    assert {"prob_abnormal", "prob_upper_limb"} <= set(again.columns)
    assert len(again) == test["study_id"].nunique()
