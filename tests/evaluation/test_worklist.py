"""Tests for the triage worklist (raysearch.evaluation.triage) on hand-made studies."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from raysearch.evaluation import triage as T

NAN = math.nan


def _stacked(rows: dict[str, dict[str, tuple[float, float]]]) -> pd.DataFrame:
    """study -> {label: (target, prob)} as one row per (study, label)."""
    out = []
    for study, labels in rows.items():
        for name, (y, p) in labels.items():
            out.append({"study_id": study, "patient_id": f"pat_{study}", "view": "frontal",
                        "label_name": name, "label": y, "prob": p})
    return pd.DataFrame(out)


HAND = {
    "s1": {"Edema": (1, 0.30), "Effusion": (0, 0.40), "No Finding": (0, 0.99),
           "Support Devices": (1, 0.95)},
    "s2": {"Edema": (0, 0.70), "Effusion": (NAN, 0.10), "No Finding": (0, 0.05),
           "Support Devices": (0, 0.10)},
    "s3": {"Edema": (NAN, 0.20), "Effusion": (NAN, 0.20), "No Finding": (1, 0.90),
           "Support Devices": (1, 0.99)},
    "s4": {"Edema": (0, 0.10), "Effusion": (0, 0.05), "No Finding": (1, 0.80),
           "Support Devices": (0, 0.20)},
}


def _abnormal(work: pd.DataFrame) -> dict[str, int | None]:
    return {s: None if pd.isna(a) else int(a) for s, a in zip(work["study_id"], work["abnormal"])}


def test_max_rule_ranks_by_the_most_likely_finding_and_ignores_no_finding_and_devices():
    work, used = T.worklist(_stacked(HAND), group="view")
    assert used == "max"
    assert work["study_id"].tolist() == ["s2", "s1", "s3", "s4"]
    assert work["p_any"].tolist() == [0.70, 0.40, 0.20, 0.10]
    assert work["rank"].tolist() == [1, 2, 3, 4]
    assert work["top_label"].tolist() == ["Edema", "Effusion", "Edema", "Edema"]
    # s1: Edema positive; s2: Edema negative, Effusion masked -> normal as far as known;
    # s3: every finding masked -> unknown; s4: all findings negative
    assert _abnormal(work) == {"s1": 1, "s2": 0, "s3": None, "s4": 0}
    assert work.set_index("study_id")["n_findings"].to_dict() == {"s1": 1, "s2": 0, "s3": 0, "s4": 0}


def test_noisy_or_rule_is_one_minus_the_product():
    work, used = T.worklist(_stacked(HAND), group="view", rule="noisy_or")
    assert used == "noisy_or"
    got = work.set_index("study_id")["p_any"]
    assert got["s1"] == pytest.approx(1 - 0.7 * 0.6)
    assert got["s2"] == pytest.approx(1 - 0.3 * 0.9)
    assert got["s4"] == pytest.approx(1 - 0.9 * 0.95)
    with pytest.raises(ValueError, match="must be one of max, noisy_or"):
        T.worklist(_stacked(HAND), group="view", rule="sum")


@pytest.mark.parametrize("name", ["Sick", "Any Finding"])
def test_an_any_finding_label_is_used_when_the_task_has_it(name):
    hand = {s: {**labels, name: (y, p)}
            for (s, labels), (y, p) in zip(HAND.items(), [(1, .2), (0, .9), (NAN, .5), (1, .6)])}
    work, used = T.worklist(_stacked(hand), group="view")
    assert used == "any_finding"
    assert work["study_id"].tolist() == ["s2", "s4", "s3", "s1"]
    assert _abnormal(work) == {"s1": 1, "s2": 0, "s3": None, "s4": 1}


def test_one_label_tasks_rank_by_their_probability():
    studies = pd.DataFrame({"study_id": ["a", "b", "c"], "patient_id": ["p", "q", "r"],
                            "body_part": ["XR_HAND"] * 3, "label": [1, 0, 1],
                            "prob": [0.2, 0.9, 0.5]})
    work, used = T.worklist(studies, group="body_part")
    assert work["study_id"].tolist() == ["b", "c", "a"] and used == "max"
    assert work["abnormal"].tolist() == [0, 1, 1]


def _list(abnormal: list[int], patients: list[str] | None = None) -> pd.DataFrame:
    n = len(abnormal)
    return pd.DataFrame({"rank": np.arange(1, n + 1), "study_id": [f"s{i}" for i in range(n)],
                         "patient_id": patients or [f"p{i}" for i in range(n)],
                         "abnormal": pd.array(abnormal, dtype="Int64")})


def test_triage_counts_against_a_random_order():
    # 20 studies, 5 abnormal, at ranks 1, 2, 4, 9, 15
    ab = [0] * 20
    for r in (1, 2, 4, 9, 15):
        ab[r - 1] = 1
    table = T.triage_table(_list(ab), n_boot=300, seed=0)
    assert list(table.columns) == list(T.TRIAGE_COLUMNS)
    assert table["n_top"].tolist() == [2, 4, 10]
    assert table["found"].tolist() == [2, 3, 4]
    assert table["expected_random"].tolist() == pytest.approx([0.5, 1.0, 2.5])
    assert table["captured"].tolist() == pytest.approx([0.4, 0.6, 0.8])
    assert table["random_captured"].tolist() == pytest.approx([0.1, 0.2, 0.5])
    assert table["lift"].tolist() == pytest.approx([4.0, 3.0, 1.6])
    for r in table.itertuples():
        assert r.captured_low <= r.captured <= r.captured_high
        assert r.lift_low <= r.lift <= r.lift_high


def test_triage_leaves_out_unknown_studies_and_resamples_patients():
    ab = [1, 1, pd.NA, 0, 0, 0, 1, 0, 0, 0, 0]
    table = T.triage_table(_list(ab), fractions=(0.2,), n_boot=200, seed=1)
    assert table["n_studies"].tolist() == [10] and table["n_abnormal"].tolist() == [3]
    assert table["found"].tolist() == [2]
    # one patient holding every study: every replicate is the whole list, the interval a point
    one = T.triage_table(_list([1, 0, 1, 0], patients=["p"] * 4), fractions=(0.5,), n_boot=50)
    assert one["captured_low"].iloc[0] == one["captured_high"].iloc[0] == 0.5
    with pytest.raises(ValueError, match="fraction"):
        T.triage_table(_list(ab), fractions=(0.0,))


def test_no_abnormal_study_gives_nan_not_an_error():
    table = T.triage_table(_list([0, 0, 0, 0]), n_boot=20)
    assert table["captured"].isna().all() and table["lift"].isna().all()
    assert (table["found"] == 0).all()
