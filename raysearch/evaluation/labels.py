"""Evaluation, per label: ranking and threshold metrics of every label of a task, per group and
over all studies, with patient-bootstrap 95% intervals (no torch, no ray).

Source report 3 (CheXpert triage, see DOMAIN.md) reports per label the ROC AUC, the
precision-recall AUC, and precision, recall and F1 at the thresholds 0.4 to 0.8; the issue adds
the threshold chosen on val for a target sensitivity, applied untouched to test. Point values come
from scikit-learn (``roc_auc_score``, ``average_precision_score``,
``precision_recall_fscore_support``). The intervals come from the same seeded bootstrap over
*patients* as MURA's kappa (:func:`raysearch.evaluation.metrics.patient_resamples`): a
replicate weighs every study by how often its patient was drawn, and every metric of one
(label, group) cell is computed on the same replicates. The weighted replicate metrics are
vectorised here; a test checks each replicate against scikit-learn with ``sample_weight``.

Input: one row per (study, label) with ``label_name``, ``label`` (0/1; NaN = masked, left out of
that label only), ``patient_id``, the group column and a probability column, as
:func:`raysearch.evaluation.metrics.aggregate_studies` makes it with ``keys=["label_name"]``.
A study is positive at threshold t when ``prob > t`` (strictly), as everywhere in raysearch.

Undefined values (AUC or AP without positives or negatives, precision without predicted
positives, ...) are ``nan``, never an exception or a warning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from raysearch.evaluation.metrics import ALL, patient_resamples

__all__ = [
    "RANKING_COLUMNS",
    "THRESHOLDS",
    "THRESHOLD_COLUMNS",
    "label_metrics",
    "ranking_metrics",
    "sensitivity_threshold",
    "threshold_metrics",
    "weighted_ap",
    "weighted_auc",
]

THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8)  # source report 3's thresholds
TARGET_SENSITIVITY = 0.9

# Columns after ``label_name`` and the group column.
RANKING_COLUMNS = (
    "n_studies", "n_patients", "n_positive", "auc", "auc_low", "auc_high",
    "ap", "ap_low", "ap_high",
)  # fmt: skip
THRESHOLD_COLUMNS = (
    "rule", "threshold", "n_studies", "tp", "fp", "tn", "fn", "precision", "precision_low",
    "precision_high", "recall", "recall_low", "recall_high", "f1", "f1_low", "f1_high",
    "specificity",
)  # fmt: skip
RULES = ("fixed", "val_sensitivity")


# --- point metrics (scikit-learn) ----------------------------------------------------------------


def _point_ranking(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """ROC AUC (nan with one class only) and average precision (nan without positives) by
    scikit-learn."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    n_pos = int(y.sum())
    auc = float(roc_auc_score(y, p)) if 0 < n_pos < len(y) else math.nan
    ap = float(average_precision_score(y, p)) if n_pos else math.nan
    return auc, ap


def _point_prf(y: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall, F1 of hard predictions by scikit-learn; nan where undefined."""
    from sklearn.metrics import precision_recall_fscore_support

    if len(y) == 0:
        return math.nan, math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # we return nan where sklearn warns
        p, r, f, _ = precision_recall_fscore_support(
            y, pred, average="binary", labels=[0, 1], zero_division=np.nan
        )
    return float(p), float(r), float(f)


# --- weighted metrics of many replicates at once -------------------------------------------------


def _bins(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, starts)``: studies sorted by score (ascending) and where each distinct score
    starts in that order (ties share a bin)."""
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return order, starts


def _bin_sums(Wo: np.ndarray, yo: np.ndarray, starts: np.ndarray):
    """Positive and negative weight per score bin: two ``[B, n_bins]`` arrays, ascending.
    ``Wo`` and ``yo`` are already in score order."""
    total = np.add.reduceat(Wo, starts, axis=1)
    pos = np.add.reduceat(Wo * yo, starts, axis=1)
    return pos, total - pos


def _auc_from_bins(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    neg_below = np.cumsum(neg, axis=1) - neg
    num = np.sum(pos * (neg_below + 0.5 * neg), axis=1)
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _ap_from_bins(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    pos, neg = pos[:, ::-1], neg[:, ::-1]  # highest score first
    tps, fps = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tps + fps > 0, tps / (tps + fps), 0.0)
        n_pos = tps[:, -1]
        return np.where(n_pos > 0, np.sum(pos * precision, axis=1) / n_pos, np.nan)


def _weighted(y: object, scores: object, W: object) -> tuple[np.ndarray, np.ndarray] | None:
    y, s, W = np.asarray(y), np.asarray(scores, np.float64), np.atleast_2d(np.asarray(W, float))
    if y.size == 0:
        return None
    order, starts = _bins(s)
    return _bin_sums(W[:, order], y[order].astype(np.float64), starts)


def weighted_auc(y: object, scores: object, W: object) -> np.ndarray:
    """ROC AUC of each row of weights ``W`` (shape ``[B, N]``, non-negative; the study weights
    of B bootstrap replicates) for labels ``y`` and ``scores`` (shape ``[N]``): the weighted
    Mann-Whitney statistic, ties between a positive and a negative counting one half, as
    ``sklearn.metrics.roc_auc_score(y, scores, sample_weight=w)``. Shape ``[B]``; nan for a
    row without positive or without negative weight."""
    bins = _weighted(y, scores, W)
    return np.full(len(np.atleast_2d(W)), np.nan) if bins is None else _auc_from_bins(*bins)


def weighted_ap(y: object, scores: object, W: object) -> np.ndarray:
    """Average precision of each row of weights ``W`` (``[B, N]``):
    AP = sum_k (R_k - R_{k-1}) P_k over the distinct scores from highest to lowest, as
    ``sklearn.metrics.average_precision_score(y, scores, sample_weight=w)`` (no interpolation).
    Shape ``[B]``; nan for a row without positive weight."""
    bins = _weighted(y, scores, W)
    return np.full(len(np.atleast_2d(W)), np.nan) if bins is None else _ap_from_bins(*bins)


def _prf_from_counts(tp, fp, fn):
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return precision, recall, f1


def _interval(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval over the replicates where the metric is defined; (nan, nan) if none."""
    v = values[~np.isnan(values)]
    if v.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(v, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


# --- one cell: a label within a group ------------------------------------------------------------


def _cell(
    y: np.ndarray, p: np.ndarray, patients: np.ndarray, *, thresholds: np.ndarray,
    n_boot: int, seed: int,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Ranking metrics and, per threshold, threshold metrics of one (label, group) cell, every
    interval from the same ``n_boot`` patient replicates."""
    codes, uniques = pd.factorize(pd.Series(patients))
    n_pat = len(uniques)
    auc, ap = _point_ranking(y, p)
    T = len(thresholds)
    # per patient and threshold: tp, fp, fn (shape [n_pat, T * 3]) for the replicate counts
    pred = p[:, None] > thresholds[None, :]  # [N, T]
    per_study = np.concatenate(
        [pred & (y[:, None] == 1), pred & (y[:, None] == 0), ~pred & (y[:, None] == 1)], axis=1
    ).astype(np.float64)
    boot = {k: np.full(n_boot, np.nan) for k in ("auc", "ap")}
    boot_prf = np.full((n_boot, 3, T), np.nan)
    if n_pat:
        per_patient = np.zeros((n_pat, 3 * T))
        np.add.at(per_patient, codes, per_study)
        order, starts = _bins(p)
        codes_sorted, y_sorted = codes[order], y[order].astype(np.float64)
        for start, times in patient_resamples(n_pat, n_boot=n_boot, seed=seed,
                                              cells_per_draw=len(y)):
            sl = slice(start, start + len(times))
            # study weights [b, N], in score order: how often each study's patient was drawn
            bins = _bin_sums(times[:, codes_sorted].astype(np.float64), y_sorted, starts)
            boot["auc"][sl] = _auc_from_bins(*bins)
            boot["ap"][sl] = _ap_from_bins(*bins)
            counts = (times.astype(np.float64) @ per_patient).reshape(len(times), 3, T)
            boot_prf[sl] = np.stack(_prf_from_counts(*counts.transpose(1, 0, 2)), axis=1)
    ranking = {
        "n_studies": len(y), "n_patients": n_pat, "n_positive": int(y.sum()),
        "auc": auc, "auc_low": _interval(boot["auc"])[0], "auc_high": _interval(boot["auc"])[1],
        "ap": ap, "ap_low": _interval(boot["ap"])[0], "ap_high": _interval(boot["ap"])[1],
    }
    rows = []
    for i, t in enumerate(thresholds):
        hard = pred[:, i].astype(np.int64)
        tp = int(((hard == 1) & (y == 1)).sum())
        fp = int(((hard == 1) & (y == 0)).sum())
        fn = int(((hard == 0) & (y == 1)).sum())
        tn = len(y) - tp - fp - fn
        prec, rec, f1 = _point_prf(y, hard)
        row = {"threshold": float(t), "n_studies": len(y), "tp": tp, "fp": fp, "tn": tn, "fn": fn}
        for j, (name, value) in enumerate((("precision", prec), ("recall", rec), ("f1", f1))):
            low, high = _interval(boot_prf[:, j, i])
            row.update({name: value, f"{name}_low": low, f"{name}_high": high})
        row["specificity"] = tn / (tn + fp) if tn + fp else math.nan
        rows.append(row)
    return ranking, rows


# --- the tables ----------------------------------------------------------------------------------


def sensitivity_threshold(
    y_true: object, probs: object, *, target: float = TARGET_SENSITIVITY
) -> float:
    """The highest threshold t whose decisions ``probs > t`` reach sensitivity >= ``target`` on
    (val) studies ``y_true``, ``probs`` (shape ``[N]``): the most specific operating point that
    still finds that share of the positives. Among the equivalent thresholds (all those between
    the k-th highest positive score and the next lower score) it returns the midpoint, as
    :func:`raysearch.evaluation.metrics.choose_threshold` does; 0.0 when only ``probs > 0``
    would do. nan without positives. ``ValueError`` for a target outside (0, 1]."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity: must lie in (0, 1], got {target}")
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    pos = np.sort(p[y == 1])[::-1]
    if pos.size == 0:
        return math.nan
    k = math.ceil(round(target * pos.size, 9))  # positives that must score above t
    kth = pos[k - 1]
    lower = p[p < kth]
    return float((kth + lower.max()) / 2.0) if lower.size else 0.0


def _cells(studies: pd.DataFrame, *, group: str, groups: Sequence[str]):
    """(label, group value, rows) for every label and group present, ALL last per label."""
    for label in pd.unique(studies["label_name"]):
        sub = studies[studies["label_name"] == label]
        present = set(sub[group].astype(str))
        order = [g for g in groups if g in present]
        order += sorted(present - set(order) - {ALL})
        for g in [*order, ALL]:
            yield label, g, (sub if g == ALL else sub[sub[group].astype(str) == g])


def _check(studies: pd.DataFrame, *, prob_col: str, group: str) -> pd.DataFrame:
    required = ["label_name", "label", "patient_id", group, prob_col]
    missing = [c for c in required if c not in studies.columns]
    if missing:
        raise ValueError(f"label_metrics: missing columns {', '.join(missing)}")
    known = studies[studies["label"].notna()]  # masked labels are left out, per label
    y = known["label"].to_numpy(np.float64)
    if ((y != 0) & (y != 1)).any():
        raise ValueError(f"label_metrics: labels must be 0/1 or NaN, got {np.unique(y)[:3]}")
    p = known[prob_col].to_numpy(np.float64)
    if np.isnan(p).any():
        raise ValueError(f"label_metrics: column {prob_col!r} has NaN probabilities")
    if ALL in set(known[group].astype(str)):
        raise ValueError(f"label_metrics: {group} {ALL!r} clashes with the overall row")
    return known


def label_metrics(
    studies: pd.DataFrame,
    *,
    prob_col: str = "prob",
    group: str,
    groups: Sequence[str] = (),
    thresholds: Sequence[float] = THRESHOLDS,
    chosen: Mapping[str, float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per label and group (known ``groups`` first, the others sorted, then ``ALL``):

    * the ranking table: ``label_name, <group>, *RANKING_COLUMNS`` (ROC AUC and average
      precision with 95% patient-bootstrap intervals);
    * the threshold table: ``label_name, <group>, *THRESHOLD_COLUMNS``, one row per threshold
      of ``thresholds`` (``rule == "fixed"``) and, for a label in ``chosen`` (label -> a
      threshold chosen elsewhere, e.g. on val by :func:`sensitivity_threshold`), one row with
      ``rule == "val_sensitivity"`` at it (nan metrics when it is nan).

    ``n_boot`` replicates with ``seed`` for every cell, so models scored with the same seed are
    compared on the same patient draws. Raises ``ValueError`` for missing columns, labels other
    than 0/1/NaN or NaN probabilities.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot: must be >= 1, got {n_boot}")
    known = _check(studies, prob_col=prob_col, group=group)
    chosen = dict(chosen or {})
    ranking, at = [], []
    for label, g, sub in _cells(known, group=group, groups=groups):
        extra = chosen.get(label)
        ts = [*thresholds, *([extra] if extra is not None else [])]
        valid = np.array([t for t in ts if not math.isnan(t)], dtype=np.float64)
        r, rows = _cell(
            sub["label"].to_numpy().astype(np.int64), sub[prob_col].to_numpy(np.float64),
            sub["patient_id"].to_numpy(), thresholds=valid, n_boot=n_boot, seed=seed,
        )
        ranking.append({"label_name": label, group: g, **r})
        rules = [RULES[0]] * len(thresholds) + ([RULES[1]] if extra is not None else [])
        if extra is not None and math.isnan(extra):  # no threshold reached the target on val
            rows.append({"threshold": math.nan, "n_studies": len(sub)})
        for rule, row in zip(rules, rows):
            at.append({"label_name": label, group: g, "rule": rule, **row})
    rank_df = pd.DataFrame(ranking, columns=["label_name", group, *RANKING_COLUMNS])
    at_df = pd.DataFrame(at, columns=["label_name", group, *THRESHOLD_COLUMNS])
    for col in ("n_studies", "n_patients", "n_positive"):
        rank_df[col] = rank_df[col].astype(np.int64)
    for col in ("tp", "fp", "tn", "fn"):
        at_df[col] = at_df[col].astype("Int64")
    at_df["n_studies"] = at_df["n_studies"].astype(np.int64)
    return rank_df, at_df


def ranking_metrics(studies: pd.DataFrame, **kwargs) -> pd.DataFrame:
    """The ranking table of :func:`label_metrics` alone."""
    return label_metrics(studies, thresholds=(), **kwargs)[0]


def threshold_metrics(studies: pd.DataFrame, **kwargs) -> pd.DataFrame:
    """The threshold table of :func:`label_metrics` alone."""
    return label_metrics(studies, **kwargs)[1]
