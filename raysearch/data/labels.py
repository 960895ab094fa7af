"""Data stage, label policies: from a dataset's raw label codes to the targets a model trains on.

Readers with several labels (chexpert, nih, csv) hand over one raw code per image and label:
1.0 positive, 0.0 negative, -1.0 uncertain, NaN blank (not mentioned). The policies of a
:class:`~raysearch.config.DataConfig` then decide what is trained on (CheXpert, Irvin et al.
2019, arXiv:1901.07031, sec. 3: U-Ignore, U-Zeros, U-Ones; source report 3: drop every image
with an uncertain label, blanks to 0, drop images left all negative):

* ``uncertain``: ignore (NaN: masked in the loss), zeros, ones, or drop (the image goes);
* ``blank``: zeros, or ignore (NaN);
* ``drop_all_negative``: an image whose chosen labels are all exactly 0 goes (NaN is not 0);
* ``any_finding``: the label "Sick", 1 when any finding (every raw label but No Finding and
  Support Devices, chosen or not) is 1 after the policies, 0 when all of them are 0, else NaN.

The manifest keeps the raw codes as ``raw_<slug>`` beside the targets ``label_<slug>``, so that
the policy table can be printed from it, and so that a trial may re-derive its own training
targets under another uncertainty policy (:func:`retarget`, ``trial.uncertain``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from rich.table import Table

from raysearch.data.dataset import Task, slug
from raysearch.errors import ConfigError, DataError, name_some

__all__ = [
    "ANY_FINDING",
    "CODES",
    "LabelPolicy",
    "apply_policy",
    "choose_labels",
    "label_counts",
    "policy_table",
    "raw_column",
    "retarget",
]

ANY_FINDING = "Sick"
# Not findings: what "any finding" leaves out (report 3's Sick model).
NOT_FINDINGS = ("No Finding", "Support Devices")
CODES = (1.0, 0.0, -1.0)  # and NaN for blank


def raw_column(name: str) -> str:
    """The manifest column of a label's raw codes: 'Pleural Effusion' -> 'raw_pleural_effusion'."""
    return f"raw_{slug(name)}"


def choose_labels(available: tuple[str, ...], choice, *, competition: tuple[str, ...] = (),
                  what: str = "the dataset") -> tuple[str, ...]:
    """The labels ``choice`` (``all``, ``competition`` or a list of names) picks from
    ``available``, in the order given. Raises ConfigError naming an unknown label."""
    _check_slugs(available)
    if choice == "all":
        return tuple(available)
    if choice == "competition":
        if not competition:
            raise ConfigError(f"data.labels: {what} has no competition labels; use all or a list")
        return tuple(competition)
    unknown = [x for x in choice if x not in available and x != ANY_FINDING]
    if unknown:
        raise ConfigError(f"data.labels: unknown label {unknown[0]!r} in {what}; its labels: "
                          f"{', '.join(available)}")
    return tuple(x for x in choice if x != ANY_FINDING)


def _check_slugs(names) -> None:
    """Two labels whose column names would be the same ('Pleural Effusion', 'pleural_effusion')."""
    seen: dict[str, str] = {}
    for name in names:
        if slug(name) in seen:
            raise ConfigError(f"data.labels: {seen[slug(name)]!r} and {name!r} would share the "
                              f"column label_{slug(name)}; rename one")
        seen[slug(name)] = name


class LabelPolicy:
    """The policies of a DataConfig, as one object (see the module docstring)."""

    def __init__(self, *, uncertain: str = "ignore", blank: str = "zeros",
                 drop_all_negative: bool = False, any_finding: bool = False) -> None:
        self.uncertain, self.blank = uncertain, blank
        self.drop_all_negative, self.any_finding = drop_all_negative, any_finding

    @classmethod
    def from_data(cls, data) -> LabelPolicy:
        """The policies of a DataConfig; "Sick" listed in ``data.labels`` asks for any_finding."""
        listed = not isinstance(data.labels, str) and ANY_FINDING in data.labels
        return cls(uncertain=data.uncertain, blank=data.blank,
                   drop_all_negative=data.drop_all_negative,
                   any_finding=data.any_finding or listed)

    def __repr__(self) -> str:
        return (f"LabelPolicy(uncertain={self.uncertain}, blank={self.blank}, drop_all_negative="
                f"{self.drop_all_negative}, any_finding={self.any_finding})")


def _targets(raw: np.ndarray, *, uncertain: str, blank: str) -> np.ndarray:
    """Raw codes ``[N, K]`` -> float targets ``[N, K]`` (NaN masked) under the two policies."""
    y = raw.astype(np.float64, copy=True)
    unc, blk = y == -1.0, np.isnan(raw)
    y[unc] = {"ignore": np.nan, "drop": np.nan, "zeros": 0.0, "ones": 1.0}[uncertain]
    y[blk] = 0.0 if blank == "zeros" else np.nan
    return y


def apply_policy(frame: pd.DataFrame, labels: tuple[str, ...], policy: LabelPolicy, *,
                 findings: tuple[str, ...] | None = None) -> tuple[pd.DataFrame, list[str], dict]:
    """Apply ``policy`` to ``frame``, which holds one ``raw_<slug>`` column per name of
    ``findings`` (default: ``labels``; the raw labels any_finding looks at).

    Returns the kept rows with a ``label_<slug>`` column per chosen label (plus ``label_sick``
    with any_finding), the label names in order, and the image counts after each step
    (``read``, ``uncertain dropped``, ``all negative dropped``, ``kept``).
    """
    findings = tuple(findings if findings is not None else labels)
    raw = frame[[raw_column(x) for x in labels]].to_numpy(np.float64).reshape(len(frame), -1)
    bad = ~(np.isin(raw, CODES) | np.isnan(raw))
    if bad.any():  # readers check their values; this guards the contract
        raise DataError(f"raw label codes must be 1, 0, -1 or blank, got {np.unique(raw[bad])}")
    y = _targets(raw, uncertain=policy.uncertain, blank=policy.blank)
    names = list(labels)
    if policy.any_finding:
        cols = [raw_column(x) for x in findings if x not in NOT_FINDINGS]
        if not cols:
            raise ConfigError("data.any_finding: the dataset has no finding labels")
        f = _targets(frame[cols].to_numpy(np.float64), uncertain=policy.uncertain,
                     blank=policy.blank)
        sick = np.where((f == 1).any(axis=1), 1.0, np.where((f == 0).all(axis=1), 0.0, np.nan))
        y = np.column_stack([y, sick])
        names.append(ANY_FINDING)
    keep = np.ones(len(frame), dtype=bool)
    steps = {"read": len(frame)}
    if policy.uncertain == "drop":
        keep &= ~(raw == -1).any(axis=1)
        steps["uncertain dropped"] = int(steps["read"] - keep.sum())
    if policy.drop_all_negative:
        all_neg = (y[:, : len(labels)] == 0).all(axis=1) & keep
        keep &= ~all_neg
        steps["all negative dropped"] = int(all_neg.sum())
    out = frame.loc[keep].copy()
    for j, name in enumerate(names):
        out[f"label_{slug(name)}"] = y[keep, j]
    steps["kept"] = int(keep.sum())
    return out.reset_index(drop=True), names, steps


def retarget(frame: pd.DataFrame, task: Task, *, uncertain: str | None) -> pd.DataFrame:
    """The rows of ``frame`` (a split of a manifest) with their targets re-derived under another
    uncertainty policy ``uncertain`` (``trial.uncertain``; None keeps the manifest's targets).

    Only cells whose raw code is -1 change (ignore: NaN, zeros: 0, ones: 1); ``drop`` removes
    the rows with any -1 among the task's labels; blanks keep the data's policy. For K = 1 the
    ``label`` column is int, so ``ignore`` removes those rows too (a masked single label trains
    nothing). "Sick" (any_finding) is derived, not raw, and keeps the data's policy. Raises
    DataError when the manifest has no raw codes (MURA, or one written before them).
    """
    if uncertain is None:
        return frame
    raws = [raw_column(x) for x in task.labels if x != ANY_FINDING]
    missing = [c for c in raws if c not in frame.columns]
    if missing:
        raise DataError(f"trial.uncertain needs the raw label codes in the manifest, and it has "
                        f"no {name_some(missing)}: set data.uncertain instead")
    cols = [c for c, x in zip(task.label_columns, task.labels) if x != ANY_FINDING]
    unc = frame[raws].to_numpy(np.float64) == -1
    if uncertain == "drop" or (task.k == 1 and uncertain == "ignore"):
        return frame.loc[~unc.any(axis=1)].reset_index(drop=True)
    out = frame.copy()
    value = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[uncertain]
    for j, col in enumerate(cols):
        y = out[col].to_numpy(np.float64, copy=True)
        y[unc[:, j]] = value
        out[col] = y.astype(out[col].dtype) if task.k == 1 else y
    return out


def label_counts(frame: pd.DataFrame, labels: tuple[str, ...] | list[str], *,
                 by: str = "image") -> pd.DataFrame:
    """Per label: counts of raw positive, negative, uncertain and blank (``raw_<slug>``), and
    of the targets (``label_<slug>``) positive, negative and masked where present. ``by``:
    ``image`` (rows) or ``study`` (first row of each ``study_id``; a study's views agree)."""
    if by == "study":
        frame = frame.drop_duplicates("study_id")
    rows = []
    for name in labels:
        row = {"label": name}
        rc = raw_column(name)
        if rc in frame.columns:
            v = frame[rc].to_numpy(np.float64)
            row.update(positive=int((v == 1).sum()), negative=int((v == 0).sum()),
                       uncertain=int((v == -1).sum()), blank=int(np.isnan(v).sum()))
        lc = f"label_{slug(name)}"
        if lc in frame.columns:
            y = frame[lc].to_numpy(np.float64)
            row.update(train_positive=int((y == 1).sum()), train_negative=int((y == 0).sum()),
                       masked=int(np.isnan(y).sum()))
        rows.append(row)
    return pd.DataFrame(rows)


def policy_table(before: pd.DataFrame, after: pd.DataFrame, names: list[str], *,
                 steps: dict, policy: LabelPolicy, title: str = "labels") -> Table:
    """A Rich table, per label: images positive, negative, uncertain and blank before the
    policy, then positive, negative and masked after it; the caption gives the images kept."""
    b = label_counts(before, [n for n in names if n != ANY_FINDING]).set_index("label")
    a = label_counts(after, names).set_index("label")
    table = Table(title=f"{title} — {policy!r}")
    table.add_column("label")
    for col in ("pos", "neg", "uncertain", "blank", "→ pos", "→ neg", "→ masked"):
        table.add_column(col, justify="right")
    for name in names:
        before_cells = ([f"{b.at[name, k]:,}" for k in ("positive", "negative", "uncertain",
                                                         "blank")]
                        if name in b.index else ["", "", "", ""])
        after_cells = [f"{a.at[name, k]:,}" for k in ("train_positive", "train_negative",
                                                       "masked")]
        table.add_row(name, *before_cells, *after_cells)
    table.caption = ("images: " + ", ".join(f"{k} {v:,}" for k, v in steps.items())
                     + " (counts are images; left: raw labels, right: after the policy)")
    return table
