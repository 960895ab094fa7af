"""The ensemble for a task of K > 1 labels, end to end on a hand-made experiment folder: a
CheXpert-like task (4 labels, one masked at times, max aggregation, a view group) over the tiny
demo images, with real K-logit checkpoints scored on test by the predictor. No Ray."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch

from raysearch.cli import main
from raysearch.config import TrialConfig
from raysearch.data.dataset import Task
from raysearch.evaluation import labels as L
from raysearch.evaluation import metrics as M
from raysearch.evaluation import triage as T
from raysearch.storage import atomic_write_bytes, atomic_write_parquet, atomic_write_text, join
from tests.test_schema import assert_matches_schema

TASK = Task(name="chest", labels=("Cardiomegaly", "Edema", "Pleural Effusion", "Support Devices"),
            group="view", groups=("frontal", "lateral"), aggregation="max",
            maskable=("Edema",))
LOSSES = {"m_a": 0.40, "m_b": 0.35, "m_c": 0.55}
QUALITY = {"m_a": 1.5, "m_b": 2.0, "m_c": 0.2}


def chest_manifest(mura: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The tiny MURA images re-labelled as a 4-label chest task: labels per study (every view
    carries them), Edema masked (NaN) for about a quarter of the studies, views alternating."""
    rng = np.random.default_rng(seed)
    out = mura.drop(columns=["label"]).copy()
    out["view"] = np.where(out.groupby("study_id").cumcount() % 2 == 0, "frontal", "lateral")
    studies = out["study_id"].unique()
    for name, col in zip(TASK.labels, TASK.label_columns):
        values = (rng.random(len(studies)) < 0.4).astype(float)
        if name == "Edema":
            values[rng.random(len(studies)) < 0.25] = np.nan
        out[col] = out["study_id"].map(dict(zip(studies, values)))
    return out


def make_chest_experiment(storage: str, manifest: pd.DataFrame, *, cache_dir: str) -> str:
    exp = join(storage, "chest")
    atomic_write_parquet(manifest, join(exp, "manifest.parquet"))
    val = manifest[manifest["split"] == "val"]
    cfg = TrialConfig(arch="mobilenet_v3_small", weights="none", image_size=32, batch_size=16)
    from raysearch.models.factory import create_model

    rows = []
    for i, (tid, loss) in enumerate(LOSSES.items()):
        ckpt = join(exp, f"train-{tid}", "checkpoint_000001")
        rng = np.random.default_rng(i)
        preds = val[["image_path", "study_id", "patient_id", *TASK.label_columns]].copy()
        for lcol, pcol in zip(TASK.label_columns, TASK.prob_columns):
            y = val[lcol].fillna(0).to_numpy()
            logit = QUALITY[tid] * (2 * y - 1) + rng.normal(0, 1.0, len(val))
            preds[pcol] = (1 / (1 + np.exp(-logit))).astype(np.float32)
        atomic_write_parquet(preds, join(ckpt, "val_predictions.parquet"))
        with torch.random.fork_rng():
            torch.manual_seed(i)
            buf = io.BytesIO()
            torch.save(create_model("mobilenet_v3_small", weights="none", num_labels=TASK.k)
                       .state_dict(), buf)
        atomic_write_bytes(join(ckpt, "model.pt"), buf.getvalue())
        atomic_write_text(join(ckpt, "trial.json"), json.dumps({**cfg.to_dict(), "seed": i}))
        atomic_write_text(join(ckpt, "task.json"), json.dumps(TASK.to_dict()))
        rows.append({"trial_id": tid, "status": "completed", "epochs": 1, "best_val_loss": loss,
                     "best_epoch": 1, "best_checkpoint": ckpt, "wall_time_s": 1.0, "error": None,
                     **cfg.to_dict()})
    atomic_write_parquet(pd.DataFrame(rows), join(exp, "trials.parquet"))
    atomic_write_text(join(exp, "experiment.json"), json.dumps({
        "name": "chest", "storage": storage, "experiment_dir": exp,
        "manifest": join(exp, "manifest.parquet"), "cache_dir": cache_dir, "data": {},
        "task": TASK.to_dict(),
    }))
    return exp


@pytest.fixture(scope="module")
def chest_run(tmp_path_factory, tiny_root):
    from raysearch.data.mura import read_mura

    manifest = chest_manifest(read_mura(tiny_root, val_fraction=0.3, seed=0))
    storage = str(tmp_path_factory.mktemp("chest_reports"))
    cache_dir = str(tmp_path_factory.mktemp("chest_cache"))
    exp = make_chest_experiment(storage, manifest, cache_dir=cache_dir)
    # Through the command line, with a cross-dataset test on the tiny MURA data (read by
    # read_dataset; its one label, "abnormal", is shared with none of the chest labels).
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        rc = main(["ensemble", "--experiment", exp, "--storage", storage, "--top", "2",
                   "--method", "greedy", "--n-boot", "100", "--target-sensitivity", "0.8",
                   "--test-data", tiny_root])
    assert rc == 0, text.getvalue()
    return {"out": join(exp, "ensemble"), "manifest": manifest, "text": text.getvalue(),
            "tiny_root": tiny_root}


def _read(run, name: str) -> pd.DataFrame:
    return pd.read_parquet(join(run["out"], name))


def test_every_file_follows_its_schema_with_a_label_column(chest_run):
    checked = assert_matches_schema(chest_run["out"], group="view")
    for f in ("label_metrics", "threshold_metrics", "worklist", "triage", "category_metrics",
              "study_predictions"):
        assert f"ensemble/{f}.parquet" in checked
    studies = _read(chest_run, "study_predictions.parquet")
    assert studies.columns[:2].tolist() == ["study_id", "label_name"]
    assert set(studies["label_name"]) == set(TASK.labels)
    with open(join(chest_run["out"], "ensemble.json")) as f:
        summary = json.load(f)
    assert summary["worklist_rule"] == "max" and summary["target_sensitivity"] == 0.8
    assert set(summary["threshold"]) == set(TASK.labels)


def test_studies_take_the_max_of_their_views_and_masked_labels_have_no_row(chest_run):
    images = _read(chest_run, "image_predictions.parquet")
    studies = _read(chest_run, "study_predictions.parquet")
    again = images.groupby(["split", "study_id", "label_name"])["prob"].max()
    got = studies.set_index(["split", "study_id", "label_name"])["prob"]
    pd.testing.assert_series_equal(got.sort_index(), again.reindex(got.index).sort_index(),
                                   check_names=False)
    masked = chest_run["manifest"]["label_edema"].isna()
    masked_studies = set(chest_run["manifest"].loc[masked, "study_id"])
    edema = studies[studies["label_name"] == "Edema"]
    assert masked_studies and not masked_studies & set(edema["study_id"])
    views = set(studies["view"])
    assert "frontal+lateral" in views  # a study with both views is their combination


def test_selection_loss_is_the_mean_over_labels(chest_run):
    from raysearch.ensemble.selection import column_log_losses

    members = _read(chest_run, "members.parquet")
    studies = _read(chest_run, "study_predictions.parquet")
    val = studies[studies["split"] == "val"]
    for r in members.itertuples():
        col = f"prob_{r.trial_id}"
        per_label = [column_log_losses(sub["label"].to_numpy(float), sub[[col]].to_numpy())[0]
                     for _, sub in val.groupby("label_name")]
        assert r.val_study_log_loss == pytest.approx(np.mean(per_label), rel=1e-12)


def test_label_metrics_recompute_from_the_study_predictions(chest_run):
    from sklearn.metrics import average_precision_score, roc_auc_score

    rank = _read(chest_run, "label_metrics.parquet")
    at = _read(chest_run, "threshold_metrics.parquet")
    studies = _read(chest_run, "study_predictions.parquet")
    assert set(rank["model"]) == {"ensemble", "m_b"}  # the best single member by val_loss
    assert set(rank["label_name"]) == set(TASK.labels)
    for r in rank[rank["view"] == M.ALL].itertuples():
        sub = studies[(studies["split"] == r.split) & (studies["label_name"] == r.label_name)]
        col = "prob" if r.model == "ensemble" else f"prob_{r.model}"
        if 0 < sub["label"].sum() < len(sub):
            assert r.auc == pytest.approx(roc_auc_score(sub["label"], sub[col]))
            assert r.ap == pytest.approx(average_precision_score(sub["label"], sub[col]))
    # the val-chosen threshold reaches the target sensitivity on val, and is applied to test
    chosen = at[(at["rule"] == "val_sensitivity") & (at["view"] == M.ALL)]
    for r in chosen[chosen["split"] == "val"].itertuples():
        if not np.isnan(r.threshold):
            assert r.recall >= 0.8
        test = chosen[(chosen["split"] == "test") & (chosen["model"] == r.model)
                      & (chosen["label_name"] == r.label_name)]
        assert test["threshold"].tolist() == pytest.approx([r.threshold], nan_ok=True)
    assert set(at.loc[at["rule"] == "fixed", "threshold"]) == set(L.THRESHOLDS)


def test_worklist_ranks_test_studies_by_the_max_over_findings(chest_run):
    work = _read(chest_run, "worklist.parquet")
    studies = _read(chest_run, "study_predictions.parquet")
    test = studies[studies["split"] == "test"]
    findings = test[test["label_name"] != "Support Devices"]  # a device is no finding
    p_any = findings.groupby("study_id")["prob"].max()
    assert sorted(work["study_id"]) == sorted(test["study_id"].unique())
    assert np.allclose(work.set_index("study_id")["p_any"], p_any.reindex(work["study_id"]))
    assert (np.diff(work["p_any"]) <= 0).all()
    triage = _read(chest_run, "triage.parquet")
    assert triage["fraction"].tolist() == list(T.FRACTIONS)
    csv = pd.read_csv(join(chest_run["out"], "worklist.csv"))
    assert csv["study_id"].tolist() == work["study_id"].tolist()


def test_terminal_report_has_the_label_threshold_and_triage_tables(chest_run):
    text = chest_run["text"]
    assert "per label" in text and "Pleural Effusion" in text
    assert "F1@0.4" in text and "sens 0.8 on val" in text
    assert "abnormal studies found vs a random order" in text


# ----------------------------------------------------------------------------- cross-dataset


def nih_manifest(chest: pd.DataFrame, seed: int = 1) -> tuple[pd.DataFrame, Task]:
    """The chest run's test images as a hand-made NIH-like dataset: NIH label names (Effusion,
    not Pleural Effusion), one study per image, a label of its own (Hernia)."""
    rng = np.random.default_rng(seed)
    task = Task(name="nih", labels=("Atelectasis", "Cardiomegaly", "Effusion", "Hernia"),
                group="view", groups=("PA", "AP"), aggregation="mean")
    test = chest[chest["split"] == "test"]
    out = test[["image_path", "patient_id"]].copy()
    out["study_id"] = out["image_path"]
    out["view"] = np.where(rng.random(len(out)) < 0.5, "PA", "AP")
    out["split"] = "test"
    for col in task.label_columns:
        out[col] = (rng.random(len(out)) < 0.4).astype(float)
    return out.reset_index(drop=True), task


def test_the_ensemble_is_scored_on_another_dataset_through_the_mapping(chest_run):
    from sklearn.metrics import roc_auc_score

    from raysearch.ensemble.run import cross_dataset
    from raysearch.inference.predictor import Predictor

    other, nih = nih_manifest(chest_run["manifest"])
    home = _read(chest_run, "label_metrics.parquet")
    with open(join(chest_run["out"], "ensemble.json")) as f:
        cache_dir = json.load(f)["experiment"]  # any writable folder does for the cache
    table, mapping = cross_dataset(
        Predictor.from_dir(chest_run["out"], device="cpu"), home_task=TASK,
        home_format="chexpert", home_metrics=home, other_manifest=other, other_task=nih,
        other_format="nih", cache_dir=join(cache_dir, "cache"), tta=False, n_boot=50, seed=0,
    )
    assert mapping.shared == (("Cardiomegaly", "Cardiomegaly"), ("Pleural Effusion", "Effusion"))
    assert table["status"].tolist() == ["shared"] * 2 + ["home only"] * 2 + ["other only"] * 2
    assert [None if pd.isna(v) else v for v in table["other_label_name"]] == [
        "Cardiomegaly", "Effusion", None, None, "Atelectasis", "Hernia"]
    # the other side is the ensemble's image probability of the home label against NIH's target
    images = _read(chest_run, "image_predictions.parquet")
    images = images[(images["split"] == "test") & (images["label_name"] == "Pleural Effusion")]
    prob = images.drop_duplicates("image_path").set_index("image_path")["prob"]
    row = table[table["label_name"] == "Pleural Effusion"].iloc[0]
    assert row["other_n_studies"] == len(other)
    y = other["label_effusion"].astype(int)
    p = prob.reindex(other["image_path"]).to_numpy()
    assert row["other_auc"] == pytest.approx(roc_auc_score(y, p))
    home_all = home[(home["model"] == "ensemble") & (home["split"] == "test")
                    & (home["view"] == M.ALL) & (home["label_name"] == "Pleural Effusion")]
    assert row["home_auc"] == pytest.approx(home_all["auc"].iloc[0], nan_ok=True)


def test_cli_test_data_of_a_dataset_sharing_no_label_reports_every_label_unshared(chest_run):
    cross = _read(chest_run, "cross_dataset.parquet")
    assert cross["status"].tolist() == ["home only"] * 4 + ["other only"]
    assert [v for v in cross["label_name"] if isinstance(v, str)] == list(TASK.labels)
    assert cross["other_label_name"].tolist()[-1] == "abnormal"
    assert (cross["other_n_studies"] == 0).all() and cross["other_auc"].isna().all()
    assert (cross.loc[cross["status"] == "home only", "home_n_studies"] > 0).all()
    with open(join(chest_run["out"], "ensemble.json")) as f:
        summary = json.load(f)
    assert summary["test_data"] == chest_run["tiny_root"] and summary["test_format"] == "mura"
    assert "cross-dataset test" in chest_run["text"] and "not shared" in chest_run["text"]
