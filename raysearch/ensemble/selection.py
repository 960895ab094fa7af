"""Ensemble stage, selection: which trials join the ensemble, and with what weight.

Top-k takes the ``k`` trials with the lowest best val_loss, equally weighted (the MURA paper's
rule). Greedy selection (Caruana et al., ICML 2004) adds, with replacement, whichever trial
lowers the *study-level* log loss of the ensemble on ``val`` most, and keeps the best ensemble
seen along the way. With K > 1 labels that loss is the mean over labels of each label's mean
binary cross-entropy over its known (unmasked) studies, the search objective's rule, so a label
that is rarely masked does not outweigh one that often is. Both work on the val probabilities saved in the checkpoints: nothing is
re-run.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from raysearch.data.dataset import Task
from raysearch.ensemble.members import stack_labels
from raysearch.errors import CheckpointError, ConfigError
from raysearch.evaluation import metrics as M

__all__ = [
    "column_log_losses",
    "greedy_picks",
    "greedy_select",
    "label_mean_log_losses",
    "none_usable",
    "select_top",
    "selection_path",
    "study_matrix",
    "usable_trials",
]

_EPS = 1e-7  # the clipping of metrics.log_loss


def usable_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials with a best checkpoint and a finite best val_loss, lowest val_loss first.

    Any status counts: a trial that failed at epoch 9 still has a sound best checkpoint.
    """
    ckpt = trials["best_checkpoint"]
    has_ckpt = ckpt.map(lambda c: isinstance(c, str) and c != "").astype(bool)
    loss = pd.to_numeric(trials["best_val_loss"], errors="coerce")
    ok = trials[has_ckpt & np.isfinite(loss)]
    return ok.sort_values(["best_val_loss", "trial_id"], kind="stable").reset_index(drop=True)


def select_top(trials: pd.DataFrame, k: int) -> pd.DataFrame:
    """The ``k`` usable trials with the lowest best val_loss, each with ``weight`` 1/(their count).

    Fewer than ``k`` usable trials give a smaller ensemble (the caller says so); none is an error.
    """
    if k < 1:
        raise ConfigError(f"--top must be >= 1, got {k}")
    ok = usable_trials(trials)
    if ok.empty:
        raise CheckpointError(none_usable(trials))
    top = ok.head(k).copy()
    top["weight"] = 1.0 / len(top)
    return top.reset_index(drop=True)


def none_usable(trials: pd.DataFrame) -> str:
    if trials.empty:
        return "trials.parquet lists no trials"
    counts = trials["status"].value_counts() if "status" in trials else pd.Series(dtype=int)
    statuses = ", ".join(f"{n} {s}" for s, n in counts.items())
    return f"none of the {len(trials)} trials has a checkpoint to ensemble ({statuses})"


def greedy_select(
    val_probs: dict[str, np.ndarray],
    images: pd.DataFrame,
    *,
    max_rounds: int,
    init: int = 1,
    task: Task | None = None,
) -> dict[str, float]:
    """Greedy ensemble selection with replacement (Caruana et al., ICML 2004).

    ``val_probs`` maps each candidate to its image probabilities, aligned with the rows of
    ``images`` (``study_id``, ``patient_id``, ``body_part``, ``label``). The first ``init`` picks
    are the best single candidates; each later round adds the candidate (possibly again) that
    gives the lowest *study-level* log loss; ``max_rounds`` picks in all. Returns
    ``{trial_id: picks / total picks}`` of the best ensemble seen along the way, most picked
    first, so the result is never worse than the best single candidate (round one). Ties go to
    the earlier candidate.
    """
    picks = greedy_picks(val_probs, images, max_rounds=max_rounds, init=init, task=task)
    total = sum(picks.values())
    return {name: n / total for name, n in picks.items()}


def greedy_picks(
    val_probs: dict[str, np.ndarray], images: pd.DataFrame, *, max_rounds: int, init: int = 1,
    task: Task | None = None, path: list | None = None,
) -> dict[str, int]:
    """How often ``greedy_select`` picks each candidate (only those picked, most picked first).
    ``path``, when given, receives one ``{"round", "added", "val_study_log_loss"}`` per round:
    how the selection set's score grew with each addition."""
    if max_rounds < 1:
        raise ConfigError(f"greedy selection needs max_rounds >= 1, got {max_rounds}")
    if init < 1:
        raise ConfigError(f"greedy selection needs init >= 1, got {init}")
    if not val_probs:
        raise ValueError("greedy_select: no candidates")
    names = list(val_probs)
    labels, S, label_names = study_matrix(images, [val_probs[n] for n in names], task,
                                          with_label_names=True)
    single = label_mean_log_losses(labels, S, label_names)
    order = np.argsort(single, kind="stable")

    picks = np.zeros(len(names), dtype=np.int64)
    total = np.zeros(len(labels), dtype=np.float64)
    best_loss, best_picks = math.inf, picks
    for r in range(max_rounds):
        if r < min(init, len(names)):
            j = int(order[r])
        else:
            j = int(np.argmin(label_mean_log_losses(labels, (total[:, None] + S) / (r + 1),
                                                    label_names)))
        picks = picks.copy()
        picks[j] += 1
        total += S[:, j]
        loss = float(label_mean_log_losses(labels, (total / (r + 1))[:, None], label_names)[0])
        if path is not None:
            path.append({"round": r + 1, "added": names[j], "val_study_log_loss": loss})
        if loss < best_loss:
            best_loss, best_picks = loss, picks
    chosen = sorted(np.flatnonzero(best_picks), key=lambda j: (-best_picks[j], single[j], j))
    return {names[j]: int(best_picks[j]) for j in chosen}


def selection_path(val_probs: dict[str, np.ndarray], images: pd.DataFrame, order: list[str],
                   task: Task | None = None) -> list[dict]:
    """The selection set's study log loss (mean over labels) of the equal-weight ensemble of the
    first 1, 2, ... members of ``order`` (top-k's rank order): one
    ``{"round", "added", "val_study_log_loss"}`` per member, as ``greedy_picks`` records."""
    labels, S, label_names = study_matrix(images, [val_probs[n] for n in order], task,
                                          with_label_names=True)
    out, total = [], np.zeros(len(labels), dtype=np.float64)
    for r, name in enumerate(order):
        total += S[:, r]
        loss = float(label_mean_log_losses(labels, (total / (r + 1))[:, None], label_names)[0])
        out.append({"round": r + 1, "added": name, "val_study_log_loss": loss})
    return out


def study_matrix(
    images: pd.DataFrame, probs: list[np.ndarray], task: Task | None = None, *,
    with_label_names: bool = False,
):
    """Targets and a (rows x candidates) matrix of study probabilities, one row per (study,
    known label), studies aggregated by the task's rule (MURA's view means, CheXpert's max).

    ``images`` holds the task's label columns; each of ``probs`` is ``[N]`` or ``[N, K]``,
    aligned with its rows. With ``with_label_names`` also each row's label name."""
    task = task or Task.from_dict(None)
    cols = [f"_p{i}" for i in range(len(probs))]
    frame = images.reset_index(drop=True)
    for p in probs:
        if len(np.asarray(p)) != len(frame):
            raise ValueError(f"probabilities of length {len(p)} for {len(frame)} images")
    stacked = stack_labels(frame, dict(zip(cols, probs)), task)
    studies = M.aggregate_studies(stacked, prob_cols=cols, group=task.group,
                                  rule=task.aggregation, keys=["label_name"])
    out = studies["label"].to_numpy(np.float64), studies[cols].to_numpy(np.float64)
    return (*out, studies["label_name"].to_numpy()) if with_label_names else out


def column_log_losses(labels: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Mean binary cross-entropy of every column of ``P`` (as ``metrics.log_loss``)."""
    P = np.clip(P, _EPS, 1.0 - _EPS)
    y = labels[:, None]
    return -(y * np.log(P) + (1.0 - y) * np.log1p(-P)).mean(axis=0)


def label_mean_log_losses(labels: np.ndarray, P: np.ndarray, label_names: np.ndarray) -> np.ndarray:
    """Per column of ``P`` (rows: (study, known label) pairs, ``label_names`` naming each row's
    label), the mean over labels of each label's mean binary cross-entropy. With one label it
    is :func:`column_log_losses` itself (MURA's selection is unchanged to the last bit)."""
    names = pd.unique(np.asarray(label_names))
    if len(names) <= 1:
        return column_log_losses(labels, P)
    per_label = [column_log_losses(labels[label_names == n], P[label_names == n]) for n in names]
    return np.mean(per_label, axis=0)
