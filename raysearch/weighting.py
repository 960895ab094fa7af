"""Train stage helper: class weighting schemes for the binary cross-entropy loss (pure numpy).

Every scheme returns one weight per training image; the loss is ``mean(w_i * bce_i)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from raysearch.config import CLASS_WEIGHTINGS
from raysearch.errors import ConfigError, DataError


def example_weights(
    train: pd.DataFrame, *, scheme: str, fp_bias: float = 0.0
) -> np.ndarray:
    """Per-image loss weights for the training split.

    ``train`` needs the columns ``label``, ``body_part`` and ``study_id``, one row per image.

    Schemes:

    * ``none``: every example weighs 1.
    * ``mura``: the MURA paper's weighted BCE (Rajpurkar et al. 2017, arXiv:1712.06957, sec. 3).
      Per study type (body part) T, with N_T normal and A_T abnormal *studies* in the training
      split, an abnormal example weighs N_T / (N_T + A_T) and a normal one A_T / (N_T + A_T).
    * ``inverse``: the team project report "X-Ray Machine Learning" (source report 2). With P
      positive and N negative training examples and a false-positive bias b (default 0), a
      positive example weighs 1 + (N + b) / P and a negative one 1 + P / N.
    * ``balanced``: a single positive-class weight N / P (as ``pos_weight`` in
      ``torch.nn.BCEWithLogitsLoss``); negatives weigh 1.
    """
    if scheme not in CLASS_WEIGHTINGS:
        raise ConfigError(
            f"class_weighting: unknown value {scheme!r}; allowed: {', '.join(CLASS_WEIGHTINGS)}"
        )
    labels = train["label"].to_numpy().astype(np.int64)
    if scheme == "none":
        return np.ones(len(train), dtype=np.float32)
    if scheme == "mura":
        studies = train.drop_duplicates("study_id")
        counts = studies.groupby("body_part")["label"].agg(["sum", "count"])
        abnormal = counts["sum"].astype(float)
        normal = counts["count"].astype(float) - abnormal
        w_pos = (normal / (normal + abnormal)).to_dict()
        w_neg = (abnormal / (normal + abnormal)).to_dict()
        parts = train["body_part"].to_numpy()
        out = np.where(
            labels == 1,
            np.array([w_pos[p] for p in parts]),
            np.array([w_neg[p] for p in parts]),
        )
        return out.astype(np.float32)
    n_pos = int((labels == 1).sum())
    n_neg = int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError(
            f"class_weighting {scheme!r} needs both classes in the training split, "
            f"got {n_pos} abnormal and {n_neg} normal images"
        )
    if scheme == "inverse":
        w_pos, w_neg = 1.0 + (n_neg + fp_bias) / n_pos, 1.0 + n_pos / n_neg
    else:  # balanced
        w_pos, w_neg = n_neg / n_pos, 1.0
    return np.where(labels == 1, w_pos, w_neg).astype(np.float32)
