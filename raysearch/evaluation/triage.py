"""Evaluation, the triage worklist: studies sorted by the probability of any finding, and how many
abnormal studies the first 10, 20 and 50% of the list hold against a random order (no torch, no
ray).

Source report 3's goal (DOMAIN.md): sort a radiologist's worklist so that likely-abnormal studies
come first. A task with an "any finding" label (named ``Sick``, report 3's single model, or
``any_finding``) ranks by that label's probability. Otherwise P(any finding) is derived from the per-label probabilities
p_1..p_K of the finding labels, by one of two rules:

* ``max`` (the default): max_k p_k. It is the lower Fréchet bound of P(any) (max_k p_k <= P(A_1
  or ... or A_K) <= min(1, sum_k p_k), Fréchet 1935) and exact when findings always come
  together. Chest findings are strongly positively correlated (effusion, edema, cardiomegaly,
  consolidation appear together), so the truth lies near this bound, and a ranking by max is
  not pushed up by many small, unrelated probabilities.
* ``noisy_or``: 1 - prod_k (1 - p_k), exact only if findings were independent given the image.
  With 13 findings it saturates towards 1 (13 labels at 0.1 already give 0.75), and the
  correlated findings are counted several times: that is why it is not the default.

"No Finding" (positive means normal) and "Support Devices" (a device is no finding; report 3's
"Sick" label left it out) are not finding labels. A study is abnormal when any finding label is
known positive (with an any-finding label: that label); normal when every known finding
label is negative; unknown (left out of the triage figures, kept on the list) when all of its
finding labels are masked. A masked label thus counts as "not found", as a radiologist's report
that does not mention it.

The triage figure for a fraction f of the list (top ``ceil(f N)`` studies): ``found`` abnormal
studies in it, the ``expected_random`` number a random order puts there (``n_top * A / N``,
the hypergeometric mean), the share of all abnormal studies ``captured`` (recall in the top f;
a random order captures ``n_top / N`` on average) and the ``lift`` over random. Intervals: the
patient bootstrap of :mod:`raysearch.evaluation.metrics`, the list kept in its order, each
study weighted by how often its patient was drawn, and the top f taken by weight.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from raysearch.evaluation.metrics import patient_resamples

__all__ = [
    "ANY_FINDING",
    "FRACTIONS",
    "NOT_FINDINGS",
    "RULES",
    "TRIAGE_COLUMNS",
    "triage_table",
    "worklist",
]

# Slugs of a task's "any finding" label: the CheXpert reader's option any_finding adds "Sick"
# (report 3's name; raysearch.data.labels.ANY_FINDING), a CSV dataset may call it any_finding.
ANY_FINDING = ("sick", "any_finding")
NOT_FINDINGS = ("no_finding", "support_devices")  # slugs of labels that are no finding
RULES = ("max", "noisy_or")
FRACTIONS = (0.1, 0.2, 0.5)
TRIAGE_COLUMNS = (
    "fraction", "n_studies", "n_abnormal", "n_top", "found", "expected_random", "captured",
    "captured_low", "captured_high", "random_captured", "lift", "lift_low", "lift_high",
)  # fmt: skip


def _slug(name: str) -> str:
    # as raysearch.data.dataset.slug (evaluation may not import data: a sibling layer)
    return re.sub(r"[^0-9a-z]+", "_", str(name).lower()).strip("_")


def worklist(
    studies: pd.DataFrame, *, group: str, prob_col: str = "prob", rule: str = "max",
) -> tuple[pd.DataFrame, str]:
    """The studies from most to least likely abnormal (ties by study id), and the rule used
    (``any_finding``: the task's Sick / any_finding label; ``max`` or ``noisy_or``).

    ``studies`` has one row per (study, label): ``study_id, patient_id, <group>, label_name,
    label`` (0/1, NaN = masked) and ``prob_col``; without ``label_name`` (one label) each row is
    a study. The result: ``rank, study_id, patient_id, <group>, p_any, abnormal`` (Int64, <NA>
    when unknown), ``n_findings`` (finding labels known positive), ``top_label`` and
    ``top_prob`` (the most likely finding). Raises ``ValueError`` for an unknown rule or when no
    label is a finding.
    """
    if rule not in RULES:
        raise ValueError(f"worklist rule: must be one of {', '.join(RULES)}, got {rule!r}")
    frame = studies if "label_name" in studies.columns else studies.assign(label_name="abnormal")
    slugs = frame["label_name"].map(_slug)
    if slugs.isin(ANY_FINDING).any():
        used, findings = "any_finding", frame[slugs.isin(ANY_FINDING)]
    else:
        used, findings = rule, frame[~slugs.isin([*NOT_FINDINGS, *ANY_FINDING])]
        if findings.empty:
            raise ValueError("worklist: no label is a finding (all are "
                             f"{', '.join(sorted(set(frame['label_name'])))})")
    p = findings[prob_col].astype(np.float64)
    g = findings.assign(_p=p, _log1m=np.log1p(-p.clip(upper=1 - 1e-12)),
                        _pos=findings["label"].eq(1), _known=findings["label"].notna())
    by = g.groupby("study_id", sort=True)
    out = by[["patient_id", group]].first()
    out["p_any"] = by["_p"].max() if used != "noisy_or" else -np.expm1(by["_log1m"].sum())
    n_pos = by["_pos"].sum().astype(np.int64)
    known = by["_known"].sum()
    out["abnormal"] = pd.array(np.where(n_pos > 0, 1, 0), dtype="Int64")
    out.loc[(n_pos == 0) & (known == 0), "abnormal"] = pd.NA
    out["n_findings"] = n_pos
    top = g.sort_values(["study_id", "_p", "label_name"], ascending=[True, False, True])
    top = top.drop_duplicates("study_id").set_index("study_id")
    out["top_label"], out["top_prob"] = top["label_name"], top["_p"]
    out = out.reset_index().sort_values(["p_any", "study_id"], ascending=[False, True],
                                        kind="stable").reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1, dtype=np.int64))
    return out, used


def triage_table(
    worklist: pd.DataFrame, *, fractions: Sequence[float] = FRACTIONS, n_boot: int = 1000,
    seed: int = 0, alpha: float = 0.05,
) -> pd.DataFrame:
    """Per fraction f of the list (``worklist`` in its order, as :func:`worklist` gives it),
    the triage figures in ``TRIAGE_COLUMNS`` with patient-bootstrap intervals. Studies whose
    abnormality is unknown are left out. nan where there is no abnormal study."""
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"worklist fraction: must lie in (0, 1], got {f}")
    known = worklist[worklist["abnormal"].notna()]
    y = known["abnormal"].to_numpy(np.float64)
    n, a = len(y), float(y.sum())
    codes, uniques = pd.factorize(known["patient_id"])
    boot = np.full((n_boot, len(fractions), 2), np.nan)  # captured, random share
    if n:
        for start, times in patient_resamples(len(uniques), n_boot=n_boot, seed=seed,
                                              cells_per_draw=n):
            W = times[:, codes].astype(np.float64)  # [b, n], in list order
            before = np.cumsum(W, axis=1) - W
            total, total_pos = W.sum(1, keepdims=True), (W * y).sum(1)
            for i, f in enumerate(fractions):
                top = (before < f * total) & (W > 0)
                with np.errstate(divide="ignore", invalid="ignore"):
                    boot[start:start + len(times), i, 0] = np.where(
                        total_pos > 0, (W * y * top).sum(1) / total_pos, np.nan)
                boot[start:start + len(times), i, 1] = (W * top).sum(1) / total[:, 0]
    rows = []
    for i, f in enumerate(fractions):
        n_top = min(n, math.ceil(round(f * n, 9)))
        found = int(y[:n_top].sum())
        captured = found / a if a else math.nan
        random_share = n_top / n if n else math.nan
        cap = boot[:, i, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = cap / boot[:, i, 1]
        rows.append({
            "fraction": float(f), "n_studies": n, "n_abnormal": int(a), "n_top": n_top,
            "found": found, "expected_random": n_top * a / n if n else math.nan,
            "captured": captured, **_ci("captured", cap, alpha),
            "random_captured": random_share,
            "lift": captured / random_share if a and n_top else math.nan, **_ci("lift", lift, alpha),
        })
    return pd.DataFrame(rows, columns=list(TRIAGE_COLUMNS))


def _ci(name: str, values: np.ndarray, alpha: float) -> dict[str, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return {f"{name}_low": math.nan, f"{name}_high": math.nan}
    low, high = np.quantile(v, [alpha / 2.0, 1.0 - alpha / 2.0])
    return {f"{name}_low": float(low), f"{name}_high": float(high)}
