"""Tests for the cross-dataset label mapping (raysearch.evaluation.crossdataset) on hand-made
frames."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from raysearch.evaluation import crossdataset as X
from raysearch.evaluation import labels as L
from raysearch.evaluation import metrics as M

CHEXPERT = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
            "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
            "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices")
NIH = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
       "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
       "Hernia", "No Finding")


def test_chexpert_to_nih_shares_exactly_the_seven_findings_and_names_the_rest():
    m = X.map_labels(CHEXPERT, NIH, X.mapping_for("chexpert", "nih"))
    assert dict(m.shared) == {
        "Cardiomegaly": "Cardiomegaly", "Edema": "Edema", "Consolidation": "Consolidation",
        "Pneumonia": "Pneumonia", "Atelectasis": "Atelectasis", "Pneumothorax": "Pneumothorax",
        "Pleural Effusion": "Effusion"}
    assert [h for h, _ in m.shared] == [h for h in CHEXPERT if h in dict(m.shared)]  # home order
    # "No Finding" is in both but means different things; Lung Lesion ~ Mass is only approximate
    assert "No Finding" in m.home_only and "No Finding" in m.other_only
    assert set(m.home_only) == set(CHEXPERT) - set(dict(m.shared))
    assert set(m.other_only) == {"Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis",
                                 "Pleural_Thickening", "Hernia", "No Finding"}
    back = X.map_labels(NIH, CHEXPERT, X.mapping_for("nih", "chexpert"))
    assert ("Effusion", "Pleural Effusion") in back.shared and len(back.shared) == 7


def test_a_subset_of_labels_and_name_matching_without_a_mapping():
    five = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
    m = X.map_labels(five, NIH, X.CHEXPERT_NIH)
    assert len(m.shared) == 5 and m.home_only == ()
    assert X.mapping_for("mura", "csv") is None
    plain = X.map_labels(("Pleural Effusion", "Fracture"), ("pleural_effusion", "Nodule"))
    assert plain.shared == (("Pleural Effusion", "pleural_effusion"),)
    assert plain.home_only == ("Fracture",) and plain.other_only == ("Nodule",)
    with pytest.raises(ValueError, match="two labels map to one"):
        X.map_labels(five, NIH, {"Edema": "Edema", "Atelectasis": "Edema"})


def _nih_images() -> pd.DataFrame:
    """Six NIH images (one per study), Effusion masked on one."""
    return pd.DataFrame({
        "image_path": [f"i{i}.png" for i in range(6)], "study_id": [f"s{i}" for i in range(6)],
        "patient_id": ["a", "a", "b", "c", "d", "e"], "view": ["PA", "AP", "PA", "PA", "AP", "PA"],
        "split": "test",
        "label_effusion": [1.0, 0.0, 1.0, np.nan, 0.0, 0.0],
        "label_edema": [0.0, 0.0, 1.0, 0.0, 1.0, 0.0],
        "label_hernia": [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
    })


def test_predictions_are_scored_through_the_mapping_side_by_side():
    home_labels = ("Edema", "Pleural Effusion", "Fracture")
    images = _nih_images()
    probs = np.array([[0.1, 0.9, 0.5], [0.2, 0.3, 0.5], [0.8, 0.7, 0.5], [0.3, 0.2, 0.5],
                      [0.6, 0.4, 0.5], [0.1, 0.1, 0.5]])
    other_cols = {"Effusion": "label_effusion", "Edema": "label_edema", "Hernia": "label_hernia"}
    m = X.map_labels(home_labels, tuple(other_cols), X.CHEXPERT_NIH)
    stacked = X.stack_mapped(images, probs, home_labels=home_labels, other_columns=other_cols,
                             mapping=m)
    assert set(stacked["label_name"]) == {"Edema", "Pleural Effusion"}
    eff = stacked[stacked["label_name"] == "Pleural Effusion"]
    assert eff["other_label_name"].unique().tolist() == ["Effusion"]
    assert eff["study_id"].tolist() == ["s0", "s1", "s2", "s4", "s5"]  # s3 masked
    assert eff["prob"].tolist() == [0.9, 0.3, 0.7, 0.4, 0.1]  # the home label's column
    assert "label_hernia" not in stacked.columns

    other_rank = L.ranking_metrics(stacked, group="view", n_boot=50, seed=0)
    home_studies = pd.DataFrame({
        "study_id": ["h1", "h2", "h3", "h4"] * 3, "patient_id": ["p1", "p2", "p3", "p4"] * 3,
        "view": "frontal", "label_name": [lb for lb in home_labels for _ in range(4)],
        "label": [1, 0, 1, 0] * 3, "prob": [0.9, 0.1, 0.4, 0.6] * 3})
    home_rank = L.ranking_metrics(home_studies, group="view", n_boot=50, seed=0)
    table = X.side_by_side(home_rank, other_rank, m, home_group="view", other_group="view")
    assert list(table.columns) == list(X.SIDE_BY_SIDE_COLUMNS)
    assert table["status"].tolist() == ["shared", "shared", "home only", "other only"]
    assert table["label_name"].tolist()[:3] == ["Edema", "Pleural Effusion", "Fracture"]
    names = [None if pd.isna(v) else v for v in table["other_label_name"]]
    assert names == ["Edema", "Effusion", None, "Hernia"]
    row = table.set_index("status").loc["shared"].iloc[1]
    assert row["other_auc"] == pytest.approx(roc_auc_score([1, 0, 1, 0, 0], [.9, .3, .7, .4, .1]))
    assert row["home_auc"] == pytest.approx(0.75) and row["other_n_studies"] == 5
    unshared = table[table["status"] != "shared"]
    assert unshared["other_auc"].isna().all() and (unshared["other_n_studies"] == 0).all()
    assert math.isnan(table.iloc[3]["home_auc"])
    assert M.ALL in set(other_rank["view"])
