"""Evaluation, the cross-dataset test: a model trained on one dataset (home) scored on another
(other) through an explicit label mapping, side by side with its home scores (no torch, no ray).

Source report 3 (DOMAIN.md) trained on CheXpert and tested on ChestX-ray14 (NIH). The two
share seven findings (Irvin et al. 2019, arXiv:1901.07031; Wang et al. 2017): Atelectasis,
Cardiomegaly, Consolidation, Edema, Pneumonia, Pneumothorax, and CheXpert's Pleural Effusion,
which NIH calls Effusion. Nothing else is mapped, on purpose:

* "No Finding" exists in both, but means "none of *this* dataset's labels", and the label sets
  differ, so the two are not the same target;
* Mass/Nodule ~ Lung Lesion and Infiltration ~ Lung Opacity are only approximate (DOMAIN.md);
* NIH's labels are image-level and text-mined, CheXpert's per study: even shared labels differ
  in how they were made, which is what the cross-dataset test measures.

Every other label is reported as unshared ("home only" / "other only"), never silently dropped.
Between datasets without an explicit mapping (e.g. a CSV dataset that reuses CheXpert's names),
labels are shared where their names agree (compared as slugs: 'Pleural_Effusion' equals
'Pleural Effusion').
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raysearch.evaluation.metrics import ALL

__all__ = [
    "CHEXPERT_NIH",
    "SIDE_BY_SIDE_COLUMNS",
    "LabelMapping",
    "map_labels",
    "mapping_for",
    "side_by_side",
    "stack_mapped",
]

# CheXpert name -> NIH (ChestX-ray14) name: the seven shared findings.
CHEXPERT_NIH = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Pleural Effusion": "Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
_EXPLICIT = {("chexpert", "nih"): CHEXPERT_NIH,
             ("nih", "chexpert"): {v: k for k, v in CHEXPERT_NIH.items()}}

STATUSES = ("shared", "home only", "other only")
_METRICS = (  # of raysearch.evaluation.labels.RANKING_COLUMNS
    "n_studies", "n_positive", "auc", "auc_low", "auc_high", "ap", "ap_low", "ap_high")
SIDE_BY_SIDE_COLUMNS = (
    "label_name", "other_label_name", "status",
    *(f"home_{m}" for m in _METRICS), *(f"other_{m}" for m in _METRICS),
)  # fmt: skip


def _slug(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", str(name).lower()).strip("_")


def mapping_for(home_format: str | None, other_format: str | None) -> dict[str, str] | None:
    """The explicit mapping (home name -> other name) between two dataset formats, or None
    when there is none (labels then match by name)."""
    return _EXPLICIT.get((str(home_format).lower(), str(other_format).lower()))


@dataclass(frozen=True)
class LabelMapping:
    """Which labels two tasks share: ``shared`` pairs (home name, other name) in home order,
    and the labels of each side that have no partner."""

    shared: tuple[tuple[str, str], ...]
    home_only: tuple[str, ...]
    other_only: tuple[str, ...]

    def __repr__(self) -> str:
        return (f"LabelMapping(shared={len(self.shared)}, home_only={list(self.home_only)}, "
                f"other_only={list(self.other_only)})")


def map_labels(
    home: Sequence[str], other: Sequence[str], mapping: Mapping[str, str] | None = None
) -> LabelMapping:
    """Pair the ``home`` labels with the ``other`` labels: through ``mapping`` (home name ->
    other name; only its pairs are shared) or, without one, by equal names (as slugs). A
    mapped pair whose labels a task does not have is simply not shared. Raises ``ValueError``
    when ``mapping`` sends two home labels to one other label."""
    other_by_slug = {_slug(o): o for o in other}
    if mapping is not None:
        targets = [_slug(v) for v in mapping.values()]
        if len(set(targets)) != len(targets):
            raise ValueError(f"label mapping: two labels map to one: {dict(mapping)}")
        by_home = {_slug(h): _slug(o) for h, o in mapping.items()}
        pairs = [(h, other_by_slug[by_home[_slug(h)]]) for h in home
                 if _slug(h) in by_home and by_home[_slug(h)] in other_by_slug]
    else:
        pairs = [(h, other_by_slug[_slug(h)]) for h in home if _slug(h) in other_by_slug]
    used_home = {h for h, _ in pairs}
    used_other = {o for _, o in pairs}
    return LabelMapping(
        shared=tuple(pairs),
        home_only=tuple(h for h in home if h not in used_home),
        other_only=tuple(o for o in other if o not in used_other),
    )


def stack_mapped(
    images: pd.DataFrame, probs: np.ndarray, *, home_labels: Sequence[str],
    other_columns: Mapping[str, str], mapping: LabelMapping,
) -> pd.DataFrame:
    """One row per (image of the other dataset, shared label known there): the image's
    ``study_id``, ``patient_id`` and other columns, ``label_name`` (the *home* name),
    ``other_label_name``, ``label`` (0/1 from the other dataset's column) and ``prob`` (the
    model's probability for the home label).

    ``probs`` is ``[N, K_home]`` (aligned with ``images``, columns in ``home_labels`` order);
    ``other_columns`` maps each other label to its manifest column. Masked (NaN) targets are
    left out."""
    probs = np.asarray(probs, dtype=np.float64).reshape(len(images), len(home_labels))
    label_cols = set(other_columns.values())
    keys = [c for c in images.columns if c not in label_cols]
    frames = []
    for home, other in mapping.shared:
        col = other_columns[other]
        known = images[col].notna().to_numpy()
        frame = images.loc[known, keys].copy()
        frame.insert(frame.columns.get_loc("study_id") + 1, "label_name", home)
        frame.insert(frame.columns.get_loc("label_name") + 1, "other_label_name", other)
        frame["label"] = images.loc[known, col].astype(np.int64).to_numpy()
        frame["prob"] = probs[known, list(home_labels).index(home)]
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*keys, "label_name", "other_label_name", "label", "prob"])
    return pd.concat(frames, ignore_index=True)


def side_by_side(
    home: pd.DataFrame, other: pd.DataFrame, mapping: LabelMapping, *, home_group: str,
    other_group: str,
) -> pd.DataFrame:
    """One row per label, ``SIDE_BY_SIDE_COLUMNS``: the shared labels (home order), then the
    home-only and the other-only labels with their status and nan on the side they lack.

    ``home`` and ``other`` are ranking tables of :func:`raysearch.evaluation.labels.
    label_metrics` (their ``ALL`` rows are used; ``other`` names labels by their home name,
    as :func:`stack_mapped` does)."""
    h = home[home[home_group] == ALL].set_index("label_name")
    o = other[other[other_group] == ALL].set_index("label_name")

    def side(table: pd.DataFrame, label: str | None, prefix: str) -> dict[str, float]:
        if label is None or label not in table.index:
            return {f"{prefix}_{m}": (0 if m.startswith("n_") else math.nan) for m in _METRICS}
        return {f"{prefix}_{m}": table.loc[label, m] for m in _METRICS}

    rows = []
    for hl, ol in mapping.shared:
        rows.append({"label_name": hl, "other_label_name": ol, "status": "shared",
                     **side(h, hl, "home"), **side(o, hl, "other")})
    for hl in mapping.home_only:
        rows.append({"label_name": hl, "other_label_name": None, "status": "home only",
                     **side(h, hl, "home"), **side(o, None, "other")})
    for ol in mapping.other_only:
        rows.append({"label_name": None, "other_label_name": ol, "status": "other only",
                     **side(h, None, "home"), **side(o, None, "other")})
    out = pd.DataFrame(rows, columns=list(SIDE_BY_SIDE_COLUMNS))
    for prefix in ("home", "other"):
        for m in ("n_studies", "n_positive"):
            out[f"{prefix}_{m}"] = out[f"{prefix}_{m}"].astype(np.int64)
    return out

