"""Tests for the per-label metrics (raysearch.evaluation.labels), against scikit-learn on hand data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from raysearch.evaluation import labels as L
from raysearch.evaluation import metrics as M


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _studies(seed: int = 0, n_patients: int = 60) -> pd.DataFrame:
    """Two labels over the same studies, two views, 1-3 studies per patient; Edema is masked
    (NaN) for some studies, Effusion never."""
    rng = np.random.default_rng(seed)
    rows = []
    for pat in range(n_patients):
        for k in range(int(rng.integers(1, 4))):
            view = "frontal" if rng.random() < 0.6 else "lateral"
            for label, signal in (("Edema", 1.5), ("Effusion", 0.7)):
                y = int(rng.random() < 0.35)
                masked = label == "Edema" and rng.random() < 0.2
                score = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(0, 1))))
                rows.append({"study_id": f"p{pat}/s{k}", "label_name": label,
                             "patient_id": f"p{pat}", "view": view,
                             "label": math.nan if masked else float(y),
                             "prob": round(float(score), 2)})  # ties are common
    return pd.DataFrame(rows)


# --- the weighted replicate metrics equal scikit-learn with sample_weight ------------------------


@pytest.mark.parametrize("seed", range(8))
def test_weighted_auc_and_ap_match_sklearn_with_sample_weight(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = np.round(rng.random(n) * 0.6 + 0.3 * y, 1)  # coarse: ties within and across classes
    W = rng.integers(0, 4, size=(5, n)).astype(float)  # bootstrap-like counts, zeros included
    W[:, :2] = 1.0
    auc = L.weighted_auc(y, s, W)
    ap = L.weighted_ap(y, s, W)
    for b in range(len(W)):
        assert same(auc[b], roc_auc_score(y, s, sample_weight=W[b])), b
        assert same(ap[b], average_precision_score(y, s, sample_weight=W[b])), b


def test_weighted_metrics_without_positive_weight_are_nan():
    y, s = np.array([0, 1, 0]), np.array([0.1, 0.9, 0.3])
    W = np.array([[1.0, 0.0, 2.0], [1.0, 1.0, 1.0]])
    assert np.isnan(L.weighted_auc(y, s, W)[0]) and np.isnan(L.weighted_ap(y, s, W)[0])
    assert L.weighted_auc(y, s, W)[1] == 1.0 and L.weighted_ap(y, s, W)[1] == 1.0


# --- the tables ----------------------------------------------------------------------------------


def test_point_metrics_per_label_and_group_equal_sklearn_and_masked_labels_are_left_out():
    studies = _studies()
    rank, at = L.label_metrics(studies, group="view", groups=("lateral", "frontal"),
                               n_boot=200, seed=0)
    assert list(rank.columns) == ["label_name", "view", *L.RANKING_COLUMNS]
    assert list(at.columns) == ["label_name", "view", *L.THRESHOLD_COLUMNS]
    # known groups in the given order, then ALL, for each label
    assert rank["view"].tolist() == ["lateral", "frontal", M.ALL] * 2
    known = studies[studies["label"].notna()]
    for r in rank.itertuples():
        sub = known[known["label_name"] == r.label_name]
        if r.view != M.ALL:
            sub = sub[sub["view"] == r.view]
        y, p = sub["label"].astype(int), sub["prob"]
        assert r.n_studies == len(sub) and r.n_positive == y.sum()
        assert r.n_patients == sub["patient_id"].nunique()
        assert same(r.auc, roc_auc_score(y, p)) and same(r.ap, average_precision_score(y, p))
        assert r.auc_low <= r.auc <= r.auc_high and r.ap_low <= r.ap <= r.ap_high
    # the masked Edema studies are absent from Edema's counts, not from Effusion's
    edema = rank[(rank["label_name"] == "Edema") & (rank["view"] == M.ALL)].iloc[0]
    effusion = rank[(rank["label_name"] == "Effusion") & (rank["view"] == M.ALL)].iloc[0]
    assert edema.n_studies == studies["label_name"].eq("Edema").sum() - studies["label"].isna().sum()
    assert effusion.n_studies == studies["label_name"].eq("Effusion").sum()
    # report 3's thresholds, decided strictly above the threshold
    assert sorted(set(at["threshold"])) == list(L.THRESHOLDS)
    for r in at.itertuples():
        sub = known[known["label_name"] == r.label_name]
        if r.view != M.ALL:
            sub = sub[sub["view"] == r.view]
        y, pred = sub["label"].astype(int), (sub["prob"] > r.threshold).astype(int)
        kw = {"zero_division": np.nan}
        assert same(r.precision, precision_score(y, pred, **kw)), r
        assert same(r.recall, recall_score(y, pred, **kw)), r
        assert same(r.f1, f1_score(y, pred, **kw)), r
        assert r.tp + r.fp + r.tn + r.fn == len(sub)
        assert r.tp == int(((pred == 1) & (y == 1)).sum())
        if not math.isnan(r.recall_low):
            assert r.recall_low <= r.recall + 1e-12 and r.recall <= r.recall_high + 1e-12


def test_intervals_resample_patients_and_are_seeded():
    studies = _studies(seed=1, n_patients=40)
    a, _ = L.label_metrics(studies, group="view", n_boot=300, seed=5, thresholds=())
    b, _ = L.label_metrics(studies, group="view", n_boot=300, seed=5, thresholds=())
    c, _ = L.label_metrics(studies, group="view", n_boot=300, seed=6, thresholds=())
    pd.testing.assert_frame_equal(a, b)
    assert not a["auc_low"].equals(c["auc_low"])
    # One patient with many identical studies: resampling patients (not studies) gives a wider
    # interval than pretending each study is its own patient.
    one = _studies(seed=2, n_patients=30)
    one = one[one["label_name"] == "Effusion"]
    heavy = pd.concat([one] + [one[one["patient_id"] == "p0"].assign(
        study_id=lambda d, i=i: d["study_id"] + f"x{i}") for i in range(25)], ignore_index=True)
    by_patient = L.ranking_metrics(heavy, group="view", n_boot=400, seed=0)
    as_studies = L.ranking_metrics(heavy.assign(patient_id=heavy["study_id"]), group="view",
                                   n_boot=400, seed=0)
    w = lambda t: float((t["auc_high"] - t["auc_low"]).iloc[-1])  # the ALL row
    assert w(by_patient) > w(as_studies)


def test_sensitivity_threshold_reaches_the_target_and_is_the_most_specific():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0])
    p = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.75, 0.5, 0.4])
    # positives score 0.9 0.8 0.7 0.5 0.3: 4 of 5 need t < 0.5; the next score below is 0.4
    t = L.sensitivity_threshold(y, p, target=0.8)
    assert t == pytest.approx(0.45)
    assert recall_score(y, p > t) >= 0.8 and recall_score(y, p > 0.5) < 0.8
    assert L.sensitivity_threshold(y, p, target=1.0) == pytest.approx(0.25)
    assert L.sensitivity_threshold([1, 0], [0.0, 0.0], target=1.0) == 0.0
    assert math.isnan(L.sensitivity_threshold([0, 0], [0.3, 0.4]))
    with pytest.raises(ValueError, match="target sensitivity"):
        L.sensitivity_threshold(y, p, target=0.0)


def test_a_threshold_chosen_on_val_is_applied_as_its_own_rule():
    studies = _studies(seed=3)
    _, at = L.label_metrics(studies, group="view", n_boot=50, seed=0, thresholds=(0.5,),
                            chosen={"Edema": 0.37, "Effusion": math.nan})
    chosen = at[at["rule"] == "val_sensitivity"]
    assert set(chosen["label_name"]) == {"Edema", "Effusion"}
    edema = chosen[chosen["label_name"] == "Edema"]
    assert (edema["threshold"] == 0.37).all() and edema["recall"].notna().all()
    effusion = chosen[chosen["label_name"] == "Effusion"]  # nothing reached the target on val
    assert effusion["threshold"].isna().all() and effusion["recall"].isna().all()
    assert (at.loc[at["rule"] == "fixed", "threshold"] == 0.5).all()


def test_bad_input_is_named():
    studies = _studies()
    with pytest.raises(ValueError, match="missing columns view"):
        L.label_metrics(studies.drop(columns="view"), group="view")
    with pytest.raises(ValueError, match="0/1 or NaN"):
        L.label_metrics(studies.assign(label=2.0), group="view")
    with pytest.raises(ValueError, match="NaN probabilities"):
        L.label_metrics(studies.assign(prob=math.nan), group="view")
