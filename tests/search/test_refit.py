"""k-fold refits of a finished search and out-of-fold ensemble selection: the folds are
patient-disjoint and stratified, out-of-fold coverage is exactly once, a killed refit resumes
without redoing finished folds, and `ensemble --oof` scores test with bagged fold models."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from raysearch.data.split import patient_folds
from raysearch.errors import ConfigError, DataError


def _images(n_patients=60, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        part = ["ELBOW", "HAND", "WRIST"][p % 3]
        for s in range(1 + p % 2):
            label = int(rng.random() < 0.4)
            for v in range(2):
                rows.append({"image_path": f"p{p}/s{s}/v{v}.png", "patient_id": f"p{p:03d}",
                             "study_id": f"p{p}/s{s}", "body_part": part, "label": label})
    return pd.DataFrame(rows)


def test_folds_are_patient_disjoint_stratified_and_seeded():
    images = _images()
    folds = patient_folds(images, k=3, seed=0, group="body_part")
    assert folds["patient_id"].is_unique and set(folds["patient_id"]) == set(images["patient_id"])
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    joined = images.merge(folds, on="patient_id")
    assert (joined.groupby("patient_id")["fold"].nunique() == 1).all()
    # every stratum (part x label) is spread over the folds about evenly
    shares = joined.groupby(["body_part", "label"])["fold"].value_counts(normalize=True)
    assert shares.min() > 0.15 and shares.max() < 0.55
    assert patient_folds(images, k=3, seed=0, group="body_part").equals(folds)
    assert not patient_folds(images, k=3, seed=1, group="body_part").equals(folds)


def test_bad_fold_counts_are_refused():
    with pytest.raises(ConfigError, match="--folds must be an integer >= 2"):
        patient_folds(_images(), k=1, seed=0, group="body_part")
    with pytest.raises(DataError, match="5 folds need at least 5 patients"):
        patient_folds(_images(n_patients=3), k=5, seed=0, group="body_part")


@pytest.mark.slow
def test_refit_writes_folds_and_oof_predictions_resumes_and_ensembles(small_experiment, tmp_path):
    from raysearch.ensemble.run import run_ensemble
    from raysearch.search.refit import run_refit

    exp = str(tmp_path / "exp")
    shutil.copytree(small_experiment, exp, ignore=shutil.ignore_patterns("ensemble*", "refit"))
    out = io.StringIO()
    refit_dir = run_refit(experiment=exp, top=2, folds=3, console=Console(file=out, width=120))
    folds = pd.read_parquet(os.path.join(exp, "folds.parquet"))
    manifest = pd.read_parquet(os.path.join(exp, "manifest.parquet"))
    training = manifest[manifest["split"].isin(["train", "val"])]
    assert set(folds["patient_id"]) == set(training["patient_id"].astype(str))
    assert not set(folds["patient_id"]) & set(manifest.loc[manifest.split == "test", "patient_id"])
    oof = pd.read_parquet(os.path.join(refit_dir, "oof_predictions.parquet"))
    assert oof["trial_id"].nunique() == 2
    for _, sub in oof.groupby("trial_id"):  # every training image exactly once per config
        assert sorted(sub["image_path"]) == sorted(training["image_path"])
        fold_of = training.set_index("image_path")["patient_id"].astype(str).map(
            folds.set_index("patient_id")["fold"])
        assert (sub.set_index("image_path")["fold"] == fold_of.reindex(sub["image_path"])).all()
    trials = pd.read_parquet(os.path.join(exp, "trials.parquet"))
    refit_rows = trials[trials["cv_folds"].notna()]
    assert len(refit_rows) == 2 and (refit_rows["cv_folds"] == 3).all()
    assert refit_rows["cv_val_loss_sd"].notna().all()
    refits = pd.read_parquet(os.path.join(refit_dir, "refits.parquet"))
    assert len(refits) == 6

    # A killed refit: one run lost its final checkpoint. The rerun trains only that one, from
    # its last checkpoint; the other five are not touched.
    victim = refits.iloc[0]
    stamps = {r.checkpoint: os.path.getmtime(os.path.join(exp, r.checkpoint, "model.pt"))
              for r in refits.iloc[1:].itertuples()}
    shutil.rmtree(os.path.join(exp, victim["checkpoint"]))
    out = io.StringIO()
    run_refit(experiment=exp, top=2, folds=3, console=Console(file=out, width=120))
    assert "5 finished earlier, 1 to run" in out.getvalue()
    assert all(os.path.getmtime(os.path.join(exp, c, "model.pt")) == t for c, t in stamps.items())
    assert os.path.isdir(os.path.join(exp, victim["checkpoint"]))
    with pytest.raises(ConfigError, match="use --folds 3"):
        run_refit(experiment=exp, top=2, folds=4, console=Console(file=io.StringIO()))
    with pytest.raises(ConfigError, match="folds were drawn with seed 0; use --seed 0"):
        run_refit(experiment=exp, top=2, seed=1, console=Console(file=io.StringIO()))
    out = io.StringIO()  # no --folds: the saved folds, nothing left to run
    run_refit(experiment=exp, top=2, console=Console(file=out, width=120))
    assert "6 finished earlier, 0 to run" in out.getvalue()
    from raysearch.experiment.status import experiment_status

    st = experiment_status(exp)
    assert (st.refit["configurations"], st.refit["folds"], st.refit["runs"]) == (2, 3, 6)
    assert st.refit["epochs"] == int(refits["epochs"].sum()) and st.refit["device_hours"] > 0

    ens = run_ensemble(experiment=exp, top=2, oof=True, n_boot=20, out=str(tmp_path / "ens"),
                       console=Console(file=io.StringIO(), width=120))
    with open(os.path.join(ens, "ensemble.json")) as f:
        summary = json.load(f)
    assert summary["selection"] == "oof" and summary["folds"] == 3
    members = pd.read_parquet(os.path.join(ens, "members.parquet"))
    assert len(members) == 3 * members["trial_id"].str.rsplit("_f", n=1).str[0].nunique()
    assert members["weight"].sum() == pytest.approx(1.0)
    studies = pd.read_parquet(os.path.join(ens, "study_predictions.parquet"))
    assert set(studies["split"]) == {"test", "oof"}
    # The predictor of the written folder (each fold model a member) gives the same test
    # probabilities as the bagged ensemble.
    from raysearch.inference.predictor import Predictor

    test = manifest[manifest.split == "test"]
    _, again = Predictor.from_dir(ens).predict_studies(test)
    mine = studies[studies.split == "test"].set_index("study_id")["prob"]
    np.testing.assert_allclose(again.set_index("study_id")["prob"].reindex(mine.index), mine,
                               atol=1e-6)
    metrics = pd.read_parquet(os.path.join(ens, "category_metrics.parquet"))
    assert set(metrics["split"]) == {"test", "oof"}
    run_ensemble(experiment=exp, top=2, oof=True, n_boot=20,
                 console=Console(file=io.StringIO(), width=120))
    assert experiment_status(exp).selection == "oof"


@pytest.mark.parametrize("argv, line", [
    (["refit", "--folds", "1"], "raysearch: error: --folds must be an integer >= 2, got 1"),
    (["refit", "--top", "0"], "raysearch: error: --top must be >= 1, got 0"),
])
def test_bad_refit_arguments_get_one_line_and_exit_2(argv, line, capsys, tmp_path):
    from raysearch.cli import main

    assert main([*argv, "--storage", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == line


def test_ensemble_oof_without_a_refit_says_to_run_it(small_experiment, capsys):
    from raysearch.cli import main

    assert main(["ensemble", "--experiment", small_experiment, "--oof", "--n-boot", "5",
                 "--out", small_experiment + "-oof-none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("has no finished refit (refit/refits.parquet); run `raysearch refit` first")
