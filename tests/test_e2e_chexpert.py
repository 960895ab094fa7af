"""End to end on chest radiographs: `demo-data --format chexpert` -> a tiny search whose trials
train under different uncertainty policies -> the ensemble; several labels all the way."""

from __future__ import annotations

import io
import os

import pandas as pd
import pytest
from rich.console import Console

SPACE = """
name: cx
data: {{root: {root}, format: chexpert, val_fraction: 0.25, seed: 0,
        labels: [Cardiomegaly, Edema, Pleural Effusion, Support Devices]}}
resources: {{workers_per_trial: 1, max_concurrent: 2, max_failures: 0}}
search:
  algorithm: tpe
  seed: 0
  num_samples: 2
  points_to_evaluate: [{{uncertain: ignore}}, {{uncertain: ones}}]
scheduler: {{kind: fifo, max_epochs: 2, grace_period: 1}}
storage: {storage}
trial: {{weights: none, batch_size: 16, augment: none, image_size: 32, arch: mobilenet_v3_small,
         lr: 0.003, precise_bn_images: 32, class_weighting: mura}}
space:
  uncertain: {{choice: [ignore, ones]}}
"""


@pytest.mark.slow
def test_chexpert_demo_searches_and_ensembles(tmp_path, ray_session):
    from raysearch.data.synth_chest import make_chexpert_demo
    from raysearch.ensemble.run import run_ensemble
    from raysearch.search.space import load_search_space
    from raysearch.search.tune import run_search

    make_chexpert_demo(str(tmp_path / "data"), size="tiny", num_workers=1)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(root=tmp_path / "data", storage=tmp_path / "reports"))
    console = Console(file=io.StringIO(), width=120)
    exp = run_search(load_search_space(str(space)), console=console)

    trials = pd.read_parquet(os.path.join(exp, "trials.parquet"))
    assert sorted(trials["uncertain"]) == ["ignore", "ones"]
    assert (trials["status"] == "completed").all()
    epochs = pd.read_parquet(os.path.join(exp, "epochs.parquet"))
    for label in ("cardiomegaly", "edema", "pleural_effusion", "support_devices"):
        assert epochs[f"val_auc_{label}"].notna().all()
        # trials.parquet keeps each label's val AUC at the trial's best epoch
        best = epochs.merge(trials[["trial_id", "best_epoch"]], on="trial_id")
        best = best[best["epoch"] == best["best_epoch"]].set_index("trial_id")
        assert (trials.set_index("trial_id")[f"val_auc_{label}"]
                == best[f"val_auc_{label}"].reindex(trials["trial_id"])).all()
    # the big findings are learnt even at 32 px in two epochs
    assert epochs.groupby("trial_id")["val_auc"].max().mean() > 0.6

    out = run_ensemble(storage=str(tmp_path / "reports"), experiment="cx", top=2, n_boot=20,
                       seed=0, console=console)
    members = pd.read_parquet(os.path.join(out, "members.parquet"))
    assert len(members) == 2
    studies = pd.read_parquet(os.path.join(out, "study_predictions.parquet"))
    # one row per (study, label), for the four labels, on val and test
    assert set(studies["label_name"]) == {"Cardiomegaly", "Edema", "Pleural Effusion",
                                          "Support Devices"}
    assert set(studies["split"]) == {"val", "test"}
    assert studies.groupby(["study_id", "label_name"]).size().max() == 1

    # The cross-dataset test on the NIH demo's layout, given by the folder demo-data was given.
    from raysearch.data.synth_chest import make_nih_demo

    make_nih_demo(str(tmp_path / "nih"), size="tiny", num_workers=1)
    out = run_ensemble(storage=str(tmp_path / "reports"), experiment="cx", top=2, n_boot=20,
                       seed=0, console=console, test_data=str(tmp_path / "nih"),
                       test_format="nih", out=str(tmp_path / "cross"))
    cross = pd.read_parquet(os.path.join(out, "cross_dataset.parquet")).set_index("label_name",
                                                                                   drop=False)
    assert cross.loc["Pleural Effusion", "other_label_name"] == "Effusion"
    assert cross.loc["Support Devices", "status"] == "home only"
    shared = cross[cross["status"] == "shared"]
    assert set(shared["label_name"]) == {"Cardiomegaly", "Edema", "Pleural Effusion"}
    assert (shared["other_n_studies"] > 0).all() and shared["other_auc"].between(0, 1).all()
