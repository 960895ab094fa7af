"""Evaluation: study-level metrics in pure numpy (no torch, no ray).

A study's probability aggregates its images' probabilities by the task's rule: the arithmetic
mean (MURA's protocol, Rajpurkar et al. 2017, arXiv:1712.06957, sec. 3) or the max (CheXpert,
Irvin et al. 2019); the study is positive when that probability is strictly greater than the
threshold (0.5). Metrics are reported per group (MURA: ``body_part``, the default column here) and
over all studies (``ALL``).

Kappa intervals come from a seeded percentile bootstrap over *patients*: the paper's intervals used
the variance where the standard error belongs and are far too narrow, and studies of one patient
are not independent, so we resample patients with replacement and take all of their studies.

Undefined values (kappa when both raters use one class, AUC with one class, sensitivity without
positives, ...) are ``nan``, never an exception and never a warning. Malformed arrays (wrong
lengths, labels outside {0, 1}, NaN probabilities) are programming errors and raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

THRESHOLD = 0.5
ALL = "ALL"

GROUP = "body_part"  # MURA's group column, the default of every function here
STUDY_KEYS = ("patient_id", GROUP, "split")  # must be constant within a study
CATEGORY_COLUMNS = (
    GROUP, "n_studies", "accuracy", "kappa", "kappa_low", "kappa_high",
    "sensitivity", "specificity", "auc", "tp", "fp", "tn", "fn",
)  # fmt: skip
AGGREGATIONS = ("mean", "max")

# Bootstrap draws are made in chunks of at most this many (replicate, group) cells, which bounds
# memory at a few tens of MB however many patients there are.
_MAX_BOOT_CELLS = 1 << 21


# --- array checks --------------------------------------------------------------------------------


def _binary(values: object, *, name: str) -> np.ndarray:
    """``values`` as a 1-d int64 array of 0/1, or ValueError naming the offending values."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if arr.size and not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name}: expected 0/1 values, got dtype {arr.dtype}")
    bad = arr[(arr != 0) & (arr != 1)]
    if bad.size:
        shown = ", ".join(str(v) for v in np.unique(bad)[:3])
        raise ValueError(f"{name}: expected 0/1 values, got {shown}")
    return arr.astype(np.int64)


def _scores(values: object, *, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array, got shape {arr.shape}")
    n_nan = int(np.isnan(arr).sum())
    if n_nan:
        raise ValueError(f"{name}: {n_nan} of {arr.size} values are NaN")
    return arr


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise ValueError(f"arrays differ in length: {shown}")


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


# --- study aggregation ---------------------------------------------------------------------------


def aggregate_studies(
    images: pd.DataFrame,
    *,
    prob_cols: Sequence[str] = ("prob",),
    group: str = GROUP,
    rule: str = "mean",
    keys: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per study (and per value of each of ``keys``): the ``rule`` (mean or max) of each
    probability column over the study's images.

    ``images`` has one row per image with the columns ``study_id``, ``patient_id``, ``group``,
    ``label``, optionally ``split``, every column in ``prob_cols`` and every column in ``keys``
    (e.g. ``label_name`` when several labels are stacked). The result has ``study_id, *keys,
    patient_id, <group>, [split], label, n_images, *prob_cols``, sorted by ``study_id`` then
    ``keys``. A study whose images disagree on label, patient or split breaks an invariant of
    the manifest and raises ``ValueError`` naming the study; a group that differs between a
    study's images (a view) becomes their combination, e.g. ``frontal+lateral``.
    """
    if rule not in AGGREGATIONS:
        raise ValueError(f"rule: must be one of {', '.join(AGGREGATIONS)}, got {rule!r}")
    prob_cols = list(prob_cols)
    by = ["study_id", *keys]
    study_keys = [k for k in ("patient_id", group, "split") if k in images.columns]
    required = [*by, "patient_id", group, "label", *prob_cols]
    missing = [c for c in required if c not in images.columns]
    if missing:
        raise ValueError(f"aggregate_studies: missing columns {', '.join(missing)}")
    for col in prob_cols:
        _scores(images[col].to_numpy(), name=f"column {col!r}")
    _binary(images["label"].to_numpy(), name="column 'label'")
    if images["study_id"].isna().any():
        raise ValueError("aggregate_studies: column 'study_id' has missing values")

    grouped = images.groupby(by, sort=True)
    for col in ["label", *[k for k in study_keys if k != group]]:
        n_values = grouped[col].nunique(dropna=False)
        bad = n_values.index[n_values.to_numpy() > 1]
        if len(bad):
            study = bad[0][0] if isinstance(bad[0], tuple) else bad[0]
            raise ValueError(
                f"study {study!r}: its images disagree on {col} ({len(bad)} studies affected)"
            )
    out = grouped[[*study_keys, "label"]].first()
    # A group that is a property of the image, not of the study (CheXpert's view: a study may
    # hold frontal and lateral views), names the study's combination: "frontal+lateral".
    if grouped[group].nunique(dropna=False).max() > 1:
        out[group] = grouped[group].agg(lambda v: "+".join(sorted({str(x) for x in v})))
    out["label"] = out["label"].astype(np.int64)
    out["n_images"] = grouped.size().astype(np.int64)
    for col in prob_cols:
        out[col] = getattr(grouped[col], rule)().astype(np.float64)
    return out.reset_index()[[*by, *study_keys, "label", "n_images", *prob_cols]]


def predict(probs: object, *, threshold: float = THRESHOLD) -> np.ndarray:
    """Hard predictions: 1 (abnormal) where ``probs > threshold`` (strictly), else 0."""
    return (_scores(probs, name="probs") > threshold).astype(np.int64)


# --- point metrics -------------------------------------------------------------------------------


def confusion(y_true: object, y_pred: object) -> dict[str, int]:
    """Confusion counts ``tp, fp, tn, fn`` for binary labels (1 = abnormal = positive)."""
    t = _binary(y_true, name="y_true")
    p = _binary(y_pred, name="y_pred")
    _same_length(y_true=t, y_pred=p)
    # cell 0 tn, 1 fp, 2 fn, 3 tp
    tn, fp, fn, tp = (int(c) for c in np.bincount(2 * t + p, minlength=4))
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def _kappa_from_counts(
    tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray
) -> np.ndarray:
    """Cohen's kappa for arrays of 2x2 tables; nan where undefined.

    kappa = 2 (tp tn - fp fn) / ((tp + fp)(fp + tn) + (tp + fn)(fn + tn)). The denominator is
    zero exactly when every study is a true negative or every one a true positive (or there are
    none), which is where scikit-learn also returns nan.
    """
    tp, fp, tn, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, tn, fn))
    num = 2.0 * (tp * tn - fp * fn)
    den = (tp + fp) * (fp + tn) + (tp + fn) * (fn + tn)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.nan)


def cohen_kappa(y_true: object, y_pred: object) -> float:
    """Cohen's kappa of two binary raters, equal to ``sklearn.metrics.cohen_kappa_score``.

    Undefined (nan, without a warning) when both use a single, shared class.
    """
    c = confusion(y_true, y_pred)
    return float(_kappa_from_counts(c["tp"], c["fp"], c["tn"], c["fn"]))



def choose_threshold(y_true: object, probs: object, *, default: float = THRESHOLD) -> float:
    """The decision threshold that maximises Cohen's kappa of ``probs > t`` against ``y_true``
    (both shape ``[N]``; binary labels, probabilities in [0, 1]).

    Meant for validation studies: the ensemble picks its threshold on val, and test is scored
    with it untouched. Candidates are ``default`` and the midpoints between consecutive distinct
    probabilities (every distinct decision is reached by one of them); ties go to the candidate
    nearest ``default``. Returns ``default`` when kappa is undefined for every candidate (one
    class only, or no studies). The criterion is kappa because it is the MURA benchmark's
    metric (Rajpurkar et al. 2017, arXiv:1712.06957); the baseline itself decides at 0.5.
    """
    t = _binary(y_true, name="y_true")
    p = _scores(probs, name="probs")
    _same_length(y_true=t, probs=p)
    values = np.unique(p)
    candidates = np.unique(np.r_[default, (values[:-1] + values[1:]) / 2.0])
    pred = p[None, :] > candidates[:, None]  # [C, N]
    tp = (pred & (t == 1)).sum(1)
    fp = (pred & (t == 0)).sum(1)
    fn = (~pred & (t == 1)).sum(1)
    tn = (~pred & (t == 0)).sum(1)
    kappas = _kappa_from_counts(tp, fp, tn, fn)
    if len(t) == 0 or np.all(np.isnan(kappas)):
        return float(default)
    best = np.nanmax(kappas)
    tied = candidates[np.isclose(kappas, best, rtol=0, atol=1e-12)]
    return float(tied[np.argmin(np.abs(tied - default))])

def roc_auc(y_true: object, scores: object) -> float:
    """Area under the ROC curve, equal to ``sklearn.metrics.roc_auc_score``.

    Computed as the Mann-Whitney statistic, with ties between a positive and a negative counting
    one half; nan when ``y_true`` holds only one class.
    """
    t = _binary(y_true, name="y_true")
    s = _scores(scores, name="scores")
    _same_length(y_true=t, scores=s)
    n_pos = int(t.sum())
    n_neg = len(t) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse = np.unique(s, return_inverse=True)
    pos = np.bincount(inverse, weights=t).astype(np.float64)
    neg = np.bincount(inverse, weights=1 - t).astype(np.float64)
    neg_below = np.cumsum(neg) - neg
    return float(np.sum(pos * (neg_below + 0.5 * neg)) / (n_pos * n_neg))


def log_loss(
    labels: object, probs: object, *, weights: object | None = None, eps: float = 1e-7
) -> float:
    """Mean binary cross-entropy, with ``probs`` clipped to ``[eps, 1 - eps]``.

    With ``weights`` it is the weighted mean ``sum(w * bce) / sum(w)`` (as scikit-learn's
    ``sample_weight``); nan when there is nothing to average.
    """
    y = _binary(labels, name="labels").astype(np.float64)
    p = np.clip(_scores(probs, name="probs"), eps, 1.0 - eps)
    _same_length(labels=y, probs=p)
    bce = -(y * np.log(p) + (1.0 - y) * np.log1p(-p))
    if weights is None:
        return float(bce.mean()) if bce.size else math.nan
    w = _scores(weights, name="weights")
    _same_length(labels=y, weights=w)
    if (w < 0).any():
        raise ValueError("weights: must be non-negative")
    total = float(w.sum())
    return float(np.dot(w, bce) / total) if total > 0 else math.nan


def binary_metrics(
    labels: object, probs: object, *, threshold: float = THRESHOLD
) -> dict[str, float]:
    """Study-level metrics at ``threshold`` (abnormal when ``prob > threshold``).

    Keys: ``n_studies, accuracy, kappa, sensitivity, specificity, auc, tp, fp, tn, fn``; nan
    where a metric is undefined (no studies, no positives, one class only, ...).
    """
    y = _binary(labels, name="labels")
    p = _scores(probs, name="probs")
    _same_length(labels=y, probs=p)
    c = confusion(y, predict(p, threshold=threshold))
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    n = len(y)
    return {
        "n_studies": n,
        "accuracy": _ratio(tp + tn, n),
        "kappa": float(_kappa_from_counts(tp, fp, tn, fn)),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "auc": roc_auc(y, p),
        **c,
    }


# --- bootstrap -----------------------------------------------------------------------------------


def bootstrap_kappas(
    labels: object, preds: object, groups: object, *, n_boot: int = 1000, seed: int = 0
) -> np.ndarray:
    """Kappa of ``n_boot`` resamples that draw whole groups (patients) with replacement.

    Each replicate draws as many groups as there are, with replacement, and takes every study of
    every drawn group (a group drawn twice counts twice). Vectorised: per-group confusion counts
    are summed by a (replicates x groups) count matrix, so no Python loop runs per replicate.
    Replicates where kappa is undefined are nan.
    """
    y = _binary(labels, name="labels")
    p = _binary(preds, name="preds")
    g = np.asarray(groups)
    _same_length(labels=y, preds=p, groups=g)
    if n_boot < 1:
        raise ValueError(f"n_boot: must be >= 1, got {n_boot}")
    if len(y) == 0:
        return np.full(n_boot, np.nan)
    codes, uniques = pd.factorize(g)
    if (codes < 0).any():
        raise ValueError(f"groups: {int((codes < 0).sum())} values are missing")
    n_groups = len(uniques)
    per_group = np.bincount(codes * 4 + 2 * y + p, minlength=4 * n_groups)
    per_group = per_group.reshape(n_groups, 4).astype(np.float64)  # tn, fp, fn, tp

    kappas = np.empty(n_boot, dtype=np.float64)
    for start, times_drawn in patient_resamples(n_groups, n_boot=n_boot, seed=seed):
        tn, fp, fn, tp = (times_drawn.astype(np.float64) @ per_group).T
        kappas[start : start + len(times_drawn)] = _kappa_from_counts(tp, fp, tn, fn)
    return kappas


def patient_resamples(
    n_groups: int, *, n_boot: int, seed: int, cells_per_draw: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """The patient bootstrap's replicates, in chunks: ``(start, times_drawn)`` where
    ``times_drawn[b, g]`` (int64, shape ``[chunk, n_groups]``) is how often replicate
    ``start + b`` drew group (patient) ``g``. Each replicate draws ``n_groups`` groups with
    replacement (Efron and Tibshirani 1993, ch. 6; whole patients, because studies of one
    patient are not independent). A chunk holds at most about ``_MAX_BOOT_CELLS`` cells of
    ``cells_per_draw`` (default ``n_groups``) each, which bounds memory; one seed gives the same
    replicates whatever the caller computes from them.
    """
    if n_groups < 1:
        raise ValueError(f"n_groups: must be >= 1, got {n_groups}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_BOOT_CELLS // max(n_groups, cells_per_draw or n_groups))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, n_groups, size=(b, n_groups))
        flat = (np.arange(b)[:, None] * n_groups + draws).ravel()
        yield start, np.bincount(flat, minlength=b * n_groups).reshape(b, n_groups)


def bootstrap_kappa_ci(
    labels: object,
    preds: object,
    groups: object,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` interval for Cohen's kappa, resampling groups.

    ``groups`` is normally the patient id. Replicates where kappa is undefined (every resampled
    study a true negative, or every one a true positive) carry no kappa and are left out of the
    quantiles; when all are, the interval is ``(nan, nan)``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha: must lie in (0, 1), got {alpha}")
    kappas = bootstrap_kappas(labels, preds, groups, n_boot=n_boot, seed=seed)
    kappas = kappas[~np.isnan(kappas)]
    if kappas.size == 0:
        return (math.nan, math.nan)
    low, high = np.quantile(kappas, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(low), float(high))


# --- per group -----------------------------------------------------------------------------------


def category_metrics(
    studies: pd.DataFrame,
    *,
    prob_col: str,
    group: str = GROUP,
    n_boot: int = 1000,
    seed: int = 0,
    threshold: float = THRESHOLD,
) -> pd.DataFrame:
    """Metrics per group (sorted) and over all studies (last row, ``<group> == 'ALL'``).

    ``studies`` has one row per study (see ``aggregate_studies``) with the columns ``group``,
    ``patient_id``, ``label`` and ``prob_col``. Columns of the result: ``CATEGORY_COLUMNS``, the
    first named ``group``. The kappa interval is a bootstrap over patients with the same ``seed``
    for every row.
    """
    required = [group, "patient_id", "label", prob_col]
    missing = [c for c in required if c not in studies.columns]
    if missing:
        raise ValueError(f"category_metrics: missing columns {', '.join(missing)}")
    if "study_id" in studies.columns and studies["study_id"].duplicated().any():
        dup = studies.loc[studies["study_id"].duplicated(), "study_id"].iloc[0]
        raise ValueError(f"category_metrics: study {dup!r} appears more than once (images?)")
    parts = sorted(studies[group].unique().tolist())
    if ALL in parts:
        raise ValueError(f"category_metrics: {group} {ALL!r} clashes with the overall row")

    rows = []
    for part in [*parts, ALL]:
        sub = studies if part == ALL else studies[studies[group] == part]
        labels = sub["label"].to_numpy()
        probs = sub[prob_col].to_numpy()
        m = binary_metrics(labels, probs, threshold=threshold)
        low, high = bootstrap_kappa_ci(
            labels, predict(probs, threshold=threshold), sub["patient_id"].to_numpy(),
            n_boot=n_boot, seed=seed,
        )
        rows.append({group: part, **m, "kappa_low": low, "kappa_high": high})
    out = pd.DataFrame(rows, columns=[group, *CATEGORY_COLUMNS[1:]])
    for col in ("n_studies", "tp", "fp", "tn", "fn"):
        out[col] = out[col].astype(np.int64)
    return out
