"""Tests for the study-level metrics (raysearch.evaluation.metrics), checked against scikit-learn."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score
from sklearn.metrics import log_loss as sk_log_loss

from raysearch.evaluation import metrics as M


def sk_kappa(y_true, y_pred) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns where it returns nan; we do not
        return float(cohen_kappa_score(y_true, y_pred))


def sk_auc(y_true, scores) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(roc_auc_score(y_true, scores))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# --- kappa and AUC against scikit-learn ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("n", [1, 2, 5, 37, 400])
def test_kappa_and_auc_match_sklearn_on_random_data(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.where(rng.random(n) < 0.7, y, 1 - y)  # correlated with y, not identical
    # coarse scores so that ties between positives and negatives are common
    scores = np.round(rng.random(n) * 0.5 + 0.4 * y, 1)
    assert same(M.cohen_kappa(y, p), sk_kappa(y, p))
    assert same(M.roc_auc(y, scores), sk_auc(y, scores))


DEGENERATE = {
    "one class in y_true": ([1, 1, 1, 1], [1, 0, 1, 0]),
    "one class in y_pred": ([1, 0, 1, 0, 0], [0, 0, 0, 0, 0]),
    "both all positive": ([1, 1, 1], [1, 1, 1]),
    "both all negative": ([0, 0], [0, 0]),
    "true all 1, pred all 0": ([1, 1, 1], [0, 0, 0]),
    "all correct": ([0, 1, 1, 0, 1], [0, 1, 1, 0, 1]),
    "all wrong": ([0, 1, 1, 0, 1], [1, 0, 0, 1, 0]),
    "single study": ([1], [0]),
}


@pytest.mark.parametrize("case", DEGENERATE)
def test_kappa_matches_sklearn_in_degenerate_cases_without_warnings(case: str) -> None:
    y, p = DEGENERATE[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = M.cohen_kappa(y, p)
    assert same(ours, sk_kappa(y, p))


def test_kappa_known_values() -> None:
    assert M.cohen_kappa([0, 1, 1, 0, 1], [0, 1, 1, 0, 1]) == 1.0
    assert M.cohen_kappa([0, 1, 1, 0], [1, 0, 0, 1]) == -1.0
    assert math.isnan(M.cohen_kappa([0, 0], [0, 0]))
    assert math.isnan(M.cohen_kappa([], []))


@pytest.mark.parametrize(
    ("y", "scores"),
    [
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]),
        ([0, 1, 0, 1, 1], [0.5, 0.5, 0.5, 0.5, 0.5]),  # all tied -> 0.5
        ([1, 0, 1, 0], [0.9, 0.9, 0.2, 0.2]),  # ties across classes
        ([0, 0, 1], [0.9, 0.8, 0.1]),  # perfectly wrong
        ([1, 0], [0.7, 0.3]),
    ],
)
def test_auc_matches_sklearn_with_ties(y, scores) -> None:
    assert same(M.roc_auc(y, scores), sk_auc(y, scores))


def test_auc_is_nan_with_one_class_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(M.roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))
        assert math.isnan(M.roc_auc([0], [0.2]))
    assert math.isnan(sk_auc([1, 1, 1], [0.2, 0.5, 0.9]))


def test_bad_inputs_raise_value_error_naming_the_problem() -> None:
    with pytest.raises(ValueError, match="y_true: expected 0/1 values, got 2"):
        M.cohen_kappa([0, 2], [0, 1])
    with pytest.raises(ValueError, match="differ in length"):
        M.roc_auc([0, 1], [0.5])
    with pytest.raises(ValueError, match="scores: 1 of 2 values are NaN"):
        M.roc_auc([0, 1], [0.5, float("nan")])


def test_log_loss_matches_sklearn_with_and_without_weights() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    p = rng.uniform(0.01, 0.99, 200)
    w = rng.uniform(0.1, 3.0, 200)
    assert math.isclose(M.log_loss(y, p), sk_log_loss(y, p), rel_tol=1e-9)
    assert math.isclose(
        M.log_loss(y, p, weights=w), sk_log_loss(y, p, sample_weight=w), rel_tol=1e-9
    )
    # clipping keeps a confident mistake finite: -log(1e-7)
    assert math.isclose(M.log_loss([1], [0.0]), -math.log(1e-7), rel_tol=1e-6)


# --- study aggregation and the > 0.5 rule -----------------------------------------------------------


def _images() -> pd.DataFrame:
    rows = [
        # study, patient, part, label, prob
        ("s1", "p1", "WRIST", 0, 0.5),  # one view exactly at 0.5 -> normal (strict >)
        ("s2", "p1", "WRIST", 1, 0.9),  # three views: mean 0.5333 -> abnormal
        ("s2", "p1", "WRIST", 1, 0.4),
        ("s2", "p1", "WRIST", 1, 0.3),
        ("s3", "p2", "HAND", 1, 0.2),  # four views: mean 0.5 exactly -> normal
        ("s3", "p2", "HAND", 1, 0.8),
        ("s3", "p2", "HAND", 1, 0.6),
        ("s3", "p2", "HAND", 1, 0.4),
        ("s4", "p3", "HAND", 0, 0.55),  # two views: mean 0.525 -> abnormal
        ("s4", "p3", "HAND", 0, 0.5),
    ]
    frame = pd.DataFrame(rows, columns=["study_id", "patient_id", "body_part", "label", "prob"])
    return frame.assign(prob2=1.0 - frame["prob"], split="valid")


def test_aggregate_studies_means_views_and_applies_the_strict_threshold() -> None:
    studies = M.aggregate_studies(_images(), prob_cols=("prob", "prob2"))
    assert list(studies.columns) == [
        "study_id", "patient_id", "body_part", "split", "label", "n_images", "prob", "prob2",
    ]  # fmt: skip
    assert studies["study_id"].tolist() == ["s1", "s2", "s3", "s4"]
    assert studies["n_images"].tolist() == [1, 3, 4, 2]
    assert studies["label"].tolist() == [0, 1, 1, 0]
    np.testing.assert_allclose(studies["prob"], [0.5, 1.6 / 3, 0.5, 0.525])
    np.testing.assert_allclose(studies["prob2"], 1.0 - studies["prob"])
    assert M.predict(studies["prob"]).tolist() == [0, 1, 0, 1]
    assert M.predict(studies["prob"]).dtype == np.int64


def test_study_mean_differs_from_image_majority() -> None:
    # image-level voting would call s2 normal (2 of 3 views below 0.5); the mean calls it abnormal
    studies = M.aggregate_studies(_images())
    s2 = studies.set_index("study_id").loc["s2"]
    assert s2["prob"] > M.THRESHOLD
    assert "split" not in M.aggregate_studies(_images().drop(columns="split")).columns


def test_aggregate_studies_rejects_a_study_with_mixed_labels() -> None:
    images = _images()
    images.loc[2, "label"] = 0
    with pytest.raises(ValueError, match="study 's2': its images disagree on label"):
        M.aggregate_studies(images)


def test_aggregate_studies_rejects_nan_probabilities_instead_of_skipping_them() -> None:
    images = _images()
    images.loc[3, "prob"] = np.nan
    with pytest.raises(ValueError, match="'prob'.*NaN"):
        M.aggregate_studies(images)


# --- binary metrics --------------------------------------------------------------------------------


def test_binary_metrics_counts_and_rates() -> None:
    labels = [1, 1, 1, 0, 0, 0, 0]
    probs = [0.9, 0.6, 0.5, 0.1, 0.2, 0.51, 0.3]  # 0.5 -> fn, 0.51 -> fp
    m = M.binary_metrics(labels, probs)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 3, 1)
    assert m["n_studies"] == 7
    assert math.isclose(m["accuracy"], 5 / 7)
    assert math.isclose(m["sensitivity"], 2 / 3)
    assert math.isclose(m["specificity"], 3 / 4)
    assert same(m["kappa"], sk_kappa(labels, M.predict(probs)))
    assert same(m["auc"], sk_auc(labels, probs))


def test_binary_metrics_are_nan_where_undefined() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = M.binary_metrics([0, 0, 0], [0.1, 0.2, 0.3])
        empty = M.binary_metrics([], [])
    assert math.isnan(m["sensitivity"]) and math.isnan(m["auc"]) and math.isnan(m["kappa"])
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0
    assert empty["n_studies"] == 0 and math.isnan(empty["accuracy"])


# --- bootstrap --------------------------------------------------------------------------------------


def _synthetic(n: int, *, seed: int, per_patient: int = 1):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    preds = np.where(rng.random(n) < 0.8, labels, 1 - labels)
    groups = np.arange(n) // per_patient
    return labels, preds, groups


def test_bootstrap_interval_contains_estimate_and_narrows_with_n() -> None:
    widths = []
    for n in (100, 2000):
        labels, preds, groups = _synthetic(n, seed=1)
        low, high = M.bootstrap_kappa_ci(labels, preds, groups, n_boot=1000, seed=0)
        assert low < M.cohen_kappa(labels, preds) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(n): about 4.5x narrower


def test_bootstrap_is_seeded() -> None:
    labels, preds, groups = _synthetic(300, seed=2, per_patient=3)
    a = M.bootstrap_kappa_ci(labels, preds, groups, n_boot=500, seed=7)
    b = M.bootstrap_kappa_ci(labels, preds, groups, n_boot=500, seed=7)
    c = M.bootstrap_kappa_ci(labels, preds, groups, n_boot=500, seed=8)
    assert a == b
    assert a != c


def test_bootstrap_resamples_whole_patients() -> None:
    # Every patient has the same 6 studies (2 tp, 2 tn, 1 fp, 1 fn). Resampling whole patients
    # always yields the same table, so kappa never moves; resampling single studies would.
    one = ([1, 1, 0, 0, 0, 1], [1, 1, 0, 0, 1, 0])
    labels = np.tile(one[0], 50)
    preds = np.tile(one[1], 50)
    patients = np.repeat([f"patient{i:05d}" for i in range(50)], 6)
    low, high = M.bootstrap_kappa_ci(labels, preds, patients, n_boot=300, seed=0)
    assert math.isclose(low, 1 / 3) and math.isclose(high, 1 / 3)
    low_s, high_s = M.bootstrap_kappa_ci(labels, preds, np.arange(300), n_boot=300, seed=0)
    assert high_s - low_s > 0.1


def test_bootstrap_is_wider_when_studies_cluster_within_patients() -> None:
    # each patient's 5 studies are copies of one: only n/5 independent units, so a wider interval
    labels, preds, _ = _synthetic(100, seed=4)
    labels, preds = np.repeat(labels, 5), np.repeat(preds, 5)
    clustered = M.bootstrap_kappa_ci(labels, preds, np.arange(500) // 5, seed=0)
    independent = M.bootstrap_kappa_ci(labels, preds, np.arange(500), seed=0)
    assert clustered[1] - clustered[0] > 1.7 * (independent[1] - independent[0])


def test_bootstrap_agrees_with_a_naive_loop() -> None:
    labels, preds, groups = _synthetic(240, seed=5, per_patient=3)
    rng = np.random.default_rng(123)
    ids = np.unique(groups)
    naive = []
    for _ in range(2000):
        drawn = rng.choice(ids, size=len(ids), replace=True)
        rows = np.concatenate([np.flatnonzero(groups == g) for g in drawn])
        naive.append(M.cohen_kappa(labels[rows], preds[rows]))
    ours = M.bootstrap_kappas(labels, preds, groups, n_boot=2000, seed=0)
    np.testing.assert_allclose(
        np.quantile(ours, [0.025, 0.5, 0.975]), np.quantile(naive, [0.025, 0.5, 0.975]), atol=0.02
    )


def test_bootstrap_chunking_covers_every_replicate(monkeypatch: pytest.MonkeyPatch) -> None:
    labels, preds, groups = _synthetic(50, seed=6)
    monkeypatch.setattr(M, "_MAX_BOOT_CELLS", 50 * 7)  # chunks of 7 replicates, last one short
    kappas = M.bootstrap_kappas(labels, preds, groups, n_boot=100, seed=0)
    assert kappas.shape == (100,) and not np.isnan(kappas).any()
    assert len(np.unique(kappas)) > 20


def test_bootstrap_degenerate_inputs() -> None:
    assert all(math.isnan(v) for v in M.bootstrap_kappa_ci([0, 0], [0, 0], [1, 2]))
    assert all(math.isnan(v) for v in M.bootstrap_kappa_ci([], [], []))
    with pytest.raises(ValueError, match="differ in length"):
        M.bootstrap_kappa_ci([0, 1], [0, 1], [1])
    with pytest.raises(ValueError, match="alpha"):
        M.bootstrap_kappa_ci([0, 1], [0, 1], [1, 2], alpha=1.5)


# --- per body part ----------------------------------------------------------------------------------


PARTS = ["ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST"]


def _studies(n: int = 700, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    return pd.DataFrame({
        "study_id": [f"s{i}" for i in range(n)],
        "patient_id": rng.integers(0, n // 2, n).astype(str),
        "body_part": rng.choice(PARTS[:-1], n),  # WRIST absent: it gets no row
        "label": labels,
        "prob": np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.25, n), 0, 1),
    })  # fmt: skip


def test_category_metrics_rows_equal_binary_metrics_on_each_subset() -> None:
    studies = _studies()
    table = M.category_metrics(studies, prob_col="prob", n_boot=200, seed=3)
    assert list(table.columns) == list(M.CATEGORY_COLUMNS)
    assert table["body_part"].tolist() == [*PARTS[:-1], "ALL"]
    for row in table.itertuples(index=False):
        sub = studies if row.body_part == "ALL" else studies[studies["body_part"] == row.body_part]
        expected = M.binary_metrics(sub["label"], sub["prob"])
        for key, value in expected.items():
            assert same(float(getattr(row, key)), float(value)), (row.body_part, key)
        ci = M.bootstrap_kappa_ci(
            sub["label"], M.predict(sub["prob"]), sub["patient_id"], n_boot=200, seed=3
        )
        assert (row.kappa_low, row.kappa_high) == ci
        assert row.kappa_low <= row.kappa <= row.kappa_high
    all_row = table.iloc[-1]
    assert all_row["n_studies"] == len(studies) == table["n_studies"].iloc[:-1].sum()
    assert all_row[["tp", "fp", "tn", "fn"]].sum() == len(studies)


def test_category_metrics_from_aggregated_images() -> None:
    table = M.category_metrics(M.aggregate_studies(_images()), prob_col="prob", n_boot=50)
    assert table["body_part"].tolist() == ["HAND", "WRIST", "ALL"]
    assert table["n_studies"].tolist() == [2, 2, 4]
    assert table.loc[2, ["tp", "fp", "tn", "fn"]].tolist() == [1, 1, 1, 1]


def test_category_metrics_rejects_duplicate_studies() -> None:
    studies = _studies(20)
    with pytest.raises(ValueError, match="study 's0' appears more than once"):
        M.category_metrics(pd.concat([studies, studies.iloc[:1]]), prob_col="prob", n_boot=10)


def test_choose_threshold_maximises_kappa_and_prefers_the_default_on_ties() -> None:
    # Separable at any t in (0.3, 0.6): kappa 1 there; the midpoint nearest 0.5 of the tied
    # candidates is 0.5 itself (a candidate), so the default is kept.
    y = np.array([0, 0, 0, 1, 1])
    assert M.choose_threshold(y, [0.1, 0.2, 0.3, 0.6, 0.9]) == 0.5
    # Separable only at t in [0.7, 0.8): every candidate in it is 0.75; 0.5 gives kappa < 1.
    assert M.choose_threshold(y, [0.1, 0.6, 0.7, 0.8, 0.9]) == pytest.approx(0.75)
    t = M.choose_threshold(y, [0.1, 0.6, 0.7, 0.8, 0.9])
    assert M.cohen_kappa(y, M.predict([0.1, 0.6, 0.7, 0.8, 0.9], threshold=t)) == 1.0
    # Undefined kappa everywhere (one class): the default.
    assert M.choose_threshold([1, 1, 1], [0.2, 0.4, 0.9], default=0.4) == 0.4
    assert M.choose_threshold([], [], default=0.5) == 0.5


def test_choose_threshold_agrees_with_a_brute_force_search() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        p = np.clip(0.3 * y + rng.random(40) * 0.7, 0, 1).round(2)
        t = M.choose_threshold(y, p)
        grid = np.linspace(0, 1, 2001)
        best = max(M.cohen_kappa(y, M.predict(p, threshold=g)) for g in grid)
        assert M.cohen_kappa(y, M.predict(p, threshold=t)) == pytest.approx(best)
