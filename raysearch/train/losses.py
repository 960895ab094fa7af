"""Train stage, the losses: class weighting schemes for the binary cross-entropy loss (pure numpy).

Every scheme returns one weight per training image; the loss is ``mean(w_i * bce_i)``. Every
weight is a positive finite number: a scheme that cannot give one (a class missing from the split)
raises :class:`~raysearch.errors.DataError` instead of silently ignoring images.
:func:`weighting_notes` says, in words, where a scheme had to depart from its formula, so the
driver can print it before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from raysearch.config import CLASS_WEIGHTINGS, MAX_FP_BIAS
from raysearch.errors import ConfigError, DataError

__all__ = ["example_weights", "label_weights", "weighting_notes"]


def example_weights(
    train: pd.DataFrame, *, scheme: str, fp_bias: float = 0.0, group: str = "body_part"
) -> np.ndarray:
    """Per-image loss weights for the training split: float32, shape ``[len(train)]``, all > 0.

    ``train`` needs the columns ``label``, ``study_id`` and the task's ``group`` (MURA:
    ``body_part``, which ``mura`` weighs by), one row per image.

    Schemes:

    * ``none``: every example weighs 1.
    * ``mura``: the MURA paper's weighted BCE (Rajpurkar et al. 2017, arXiv:1712.06957, sec. 3).
      Per study type (body part) T, with N_T normal and A_T abnormal *studies* in the training
      split, an abnormal example weighs N_T / (N_T + A_T) and a normal one A_T / (N_T + A_T).
      A body part with studies of one class only would give its images weight 0 (they would be
      ignored); such a part uses the pooled weights of the whole split instead, N / (N + A) and
      A / (N + A), and :func:`weighting_notes` names it.
    * ``inverse``: the team project report "X-Ray Machine Learning" (source report 2). With P
      positive and N negative training examples and a false-positive bias b >= 0 (default 0), a
      positive example weighs 1 + (N + b) / P and a negative one 1 + P / N.
    * ``balanced``: a single positive-class weight N / P (as ``pos_weight`` in
      ``torch.nn.BCEWithLogitsLoss``); negatives weigh 1.

    Raises ConfigError for an unknown scheme or an ``fp_bias`` outside ``[0, MAX_FP_BIAS]``,
    and DataError when the split lacks one of the classes (every scheme but ``none``).
    """
    _check_args(scheme, fp_bias)
    labels = train["label"].to_numpy().astype(np.int64)
    if scheme == "none":
        return np.ones(len(train), dtype=np.float32)
    if scheme == "mura":
        table = _mura_table(train, group=group)
        parts = train[group].to_numpy()
        w_pos = table.w_pos.reindex(parts).to_numpy()
        w_neg = table.w_neg.reindex(parts).to_numpy()
        out = np.where(labels == 1, w_pos, w_neg)
    else:
        n_pos, n_neg = _both_classes(labels, scheme=scheme, unit="images")
        if scheme == "inverse":
            w_pos, w_neg = 1.0 + (n_neg + fp_bias) / n_pos, 1.0 + n_pos / n_neg
        else:  # balanced
            w_pos, w_neg = n_neg / n_pos, 1.0
        out = np.where(labels == 1, w_pos, w_neg)
    out = out.astype(np.float32)
    # Each formula above is > 0 once both classes are present; this guards the invariant.
    assert np.all(np.isfinite(out) & (out > 0)), f"class_weighting {scheme}: a weight <= 0"
    return out


def weighting_notes(
    train: pd.DataFrame, *, scheme: str, fp_bias: float = 0.0, group: str = "body_part"
) -> list[str]:
    """Human-readable notes on where ``scheme`` departs from its plain formula on ``train``.

    One line per body part that ``mura`` gives the pooled weights (see :func:`example_weights`),
    e.g. ``"class_weighting mura: HUMERUS has only normal studies in train (12); its images use
    the pooled weights (abnormal 0.41, normal 0.59)"``, and one when ``fp_bias`` is set but the
    scheme does not use it. An empty list means the formula applies as written. Raises what
    :func:`example_weights` raises for the same arguments.
    """
    _check_args(scheme, fp_bias)
    notes = []
    if scheme == "mura":
        table = _mura_table(train, group=group)
        pooled = (
            f"the pooled weights (abnormal {table.pooled_pos:.2f}, normal {table.pooled_neg:.2f})"
        )
        for part in table.one_class:
            n_abnormal, n_normal = table.abnormal[part], table.normal[part]
            only, count = ("normal", n_normal) if n_abnormal == 0 else ("abnormal", n_abnormal)
            notes.append(
                f"class_weighting mura: {part} has only {only} studies in train ({count:g}); "
                f"its images use {pooled}"
            )
    if fp_bias and scheme != "inverse":
        notes.append(
            f"class_weighting {scheme}: fp_bias {fp_bias:g} has no effect (only `inverse` uses it)"
        )
    return notes


def label_weights(
    train: pd.DataFrame, *, task, scheme: str, fp_bias: float = 0.0
) -> np.ndarray:
    """Loss weights ``[len(train), K]`` (float32) for a task of K labels: column j is
    :func:`example_weights` of label j, computed on the images where that label is known (a
    masked label, NaN in the manifest, weighs 0: the loss ignores it anyway). For K = 1 it is
    ``example_weights`` as a column."""
    out = np.zeros((len(train), task.k), dtype=np.float32)
    for j, col in enumerate(task.label_columns):
        known = train[col].notna().to_numpy()
        if not known.any():
            raise DataError(f"label {task.labels[j]!r} is unknown for every training image")
        frame = train.loc[known].assign(label=train.loc[known, col].astype(np.int64))
        out[known, j] = example_weights(frame, scheme=scheme, fp_bias=fp_bias, group=task.group)
    return out


# ----------------------------------------------------------------------------- helpers


def _check_args(scheme: str, fp_bias: float) -> None:
    if scheme not in CLASS_WEIGHTINGS:
        raise ConfigError(
            f"class_weighting: unknown value {scheme!r}; allowed: {', '.join(CLASS_WEIGHTINGS)}"
        )
    # A negative bias could make the positive weight 1 + (N + b) / P zero or negative.
    if not 0 <= fp_bias <= MAX_FP_BIAS:
        raise ConfigError(f"fp_bias must be in [0, {MAX_FP_BIAS:g}], got {fp_bias!r}")


def _both_classes(labels: np.ndarray, *, scheme: str, unit: str) -> tuple[int, int]:
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError(
            f"class_weighting {scheme!r} needs both classes in the training split, "
            f"got {n_pos} abnormal and {n_neg} normal {unit}"
        )
    return n_pos, n_neg


@dataclass(frozen=True)
class _MuraTable:
    abnormal: pd.Series  # body part -> abnormal studies
    normal: pd.Series  # body part -> normal studies
    w_pos: pd.Series  # body part -> weight of an abnormal image
    w_neg: pd.Series  # body part -> weight of a normal image
    pooled_pos: float
    pooled_neg: float
    one_class: list[str]  # body parts with studies of one class only (they use the pooled weights)


def _mura_table(train: pd.DataFrame, *, group: str = "body_part") -> _MuraTable:
    studies = train.drop_duplicates("study_id")
    n_pos, n_neg = _both_classes(
        studies["label"].to_numpy().astype(np.int64), scheme="mura", unit="studies"
    )
    pooled_pos, pooled_neg = n_neg / (n_pos + n_neg), n_pos / (n_pos + n_neg)
    # A study counts once in each group it has images in: MURA's body part is one per study,
    # CheXpert's view (the group) is not, and a lateral view must find its group's weights.
    counts = (train.drop_duplicates(["study_id", group]).groupby(group)["label"]
              .agg(["sum", "count"]))
    abnormal = counts["sum"].astype(float)
    normal = counts["count"].astype(float) - abnormal
    one_class = (abnormal == 0) | (normal == 0)
    w_pos = (normal / (normal + abnormal)).where(~one_class, pooled_pos)
    w_neg = (abnormal / (normal + abnormal)).where(~one_class, pooled_neg)
    return _MuraTable(
        abnormal=abnormal, normal=normal, w_pos=w_pos, w_neg=w_neg,
        pooled_pos=pooled_pos, pooled_neg=pooled_neg,
        one_class=sorted(one_class.index[one_class]),
    )  # fmt: skip
