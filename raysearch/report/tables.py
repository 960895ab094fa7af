"""Report stage: Rich tables for the terminal (Parquet writers live in ``storage``, atomic).

Tables are small, numbers right-aligned; they are built from plain DataFrames/dicts so they can be
tested with ``Console(file=io.StringIO(), width=100, color_system=None)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
from rich.table import Table

KEY_PARAMS = ("arch", "image_size", "lr", "batch_size", "dropout", "class_weighting", "augment")


def fmt(value: Any, digits: int = 3) -> str:
    """Short, stable text for a table cell."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


# The trials table's columns, most important first: what is left out when the terminal is narrow.
# (key, header, header when abbreviated). Numbers and ids are never cut: a column that does not fit
# is dropped whole, the lowest in this list first.
TRIAL_COLUMNS_BY_PRIORITY = (
    ("trial_id", "trial", "trial"),
    ("status", "status", "status"),
    ("epoch", "epoch", "ep"),
    ("best_val_loss", "best", "best"),
    ("val_study_kappa", "kappa", "kappa"),
    ("arch", "arch", "arch"),
    ("val_loss", "val_loss", "loss"),
    ("image_size", "image_size", "px"),
    ("lr", "lr", "lr"),
    ("batch_size", "batch_size", "batch"),
    ("class_weighting", "class_weighting", "weighting"),
    ("dropout", "dropout", "drop"),
    ("augment", "augment", "aug"),
)
_ORDER = ("trial_id", "status", "epoch", "val_loss", "best_val_loss", "val_study_kappa",
          *KEY_PARAMS)


def _epoch_cell(row: dict[str, Any]) -> str:
    """'3/8': epochs run of the trial's ``max_epochs`` (just '3' when the limit is unknown)."""
    k = row.get("epoch", row.get("epochs"))
    if k is None or (isinstance(k, float) and math.isnan(k)):
        k = 0 if row.get("status") in ("pending", "running") else None
    if k is None:
        return "-"
    top = row.get("max_epochs")
    return f"{int(k)}/{int(top)}" if top else str(int(k))


def _cell(row: dict[str, Any], key: str) -> str:
    if key == "epoch":
        return _epoch_cell(row)
    if key in ("trial_id", "status", "arch", "class_weighting", "augment"):
        value = row.get(key)
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
    return fmt(row.get(key))


def trials_table(
    rows: Iterable[dict[str, Any]], *, title: str | None = None, params: Sequence[str] = KEY_PARAMS,
    width: int | None = None, without: Sequence[str] = (),
) -> Table:
    """Trials: id, status, epoch ('k/max'), val_loss, best val_loss, val study kappa (at the best
    epoch), key config values; not the columns named in ``without``.

    ``width`` (the terminal's columns): columns are abbreviated, then dropped by
    :data:`TRIAL_COLUMNS_BY_PRIORITY`, until the table fits; no cell is ever cut short. ``None``
    keeps every column.
    """
    rows = list(rows)
    wanted = [k for k in _ORDER if k not in without
              and (k not in KEY_PARAMS or (k in params and any(k in r for r in rows)))]
    cells = {k: [_cell(r, k) for r in rows] for k in wanted}
    short = {k: (full, abbr) for k, full, abbr in TRIAL_COLUMNS_BY_PRIORITY}
    keep = _fit_columns(wanted, cells, short, width)
    table = Table(title=title, title_justify="left")
    for key, header in keep:
        left = key in ("trial_id", "status")
        table.add_column(header, justify="left" if left else "right", no_wrap=True,
                         min_width=max([len(header)] + [len(c) for c in cells[key]]))
    for i in range(len(rows)):
        table.add_row(*[cells[key][i] for key, _ in keep])
    return table


def _fit_columns(wanted: list[str], cells: dict[str, list[str]],
                 short: dict[str, tuple[str, str]], width: int | None) -> list[tuple[str, str]]:
    """(key, header) of the columns to show, in display order: full headers if everything fits
    in ``width``, else abbreviated headers, dropping the least important columns until it fits."""

    def cost(key: str, header: str) -> int:  # the column's text, its padding and one border
        return max([len(header)] + [len(c) for c in cells[key]]) + 3

    def total(cols: list[tuple[str, str]]) -> int:
        return 1 + sum(cost(k, h) for k, h in cols)

    full = [(k, short[k][0]) for k in wanted]
    if width is None or total(full) <= width:
        return full
    cols = [(k, short[k][1]) for k in wanted]
    by_priority = [k for k, _, _ in TRIAL_COLUMNS_BY_PRIORITY if k in wanted]
    while total(cols) > width and len(cols) > 2:
        drop = by_priority.pop()
        cols = [(k, h) for k, h in cols if k != drop]
    return cols


def best_trials_table(trials: pd.DataFrame, *, n: int = 10, title: str | None = None,
                      width: int | None = None) -> Table:
    """The ``n`` trials with the lowest best val_loss (trials.parquet rows), fitted to ``width``
    (see :func:`trials_table`)."""
    ok = trials[trials["best_val_loss"].notna()].nsmallest(n, "best_val_loss")
    rows = [{**r, "epoch": r.get("epochs")} for r in ok.to_dict("records")]
    # trials.parquet keeps the best epoch's loss, not the last one's: no `val_loss` column (the
    # last epoch's, live), rather than one that repeats `best` or shows "-" on every row.
    return trials_table(rows, title=title, width=width, without=("val_loss",))


def epochs_table(epochs: pd.DataFrame, *, title: str | None = None) -> Table:
    """One row per reported epoch of a single trial."""
    table = Table(title=title, title_justify="left")
    # Short headers, so that a 100-column terminal shows every column whole.
    headers = {"epoch": "epoch", "train_loss": "train_loss", "val_loss": "val_loss",
               "val_auc": "auc", "val_study_accuracy": "study acc", "val_study_kappa": "kappa",
               "lr": "lr", "epoch_time_s": "train s", "train_images_per_s": "images/s"}
    cols = [c for c in headers if c in epochs.columns]
    for c in cols:
        table.add_column(headers[c], justify="right", no_wrap=True)
    for r in epochs[cols].to_dict("records"):
        table.add_row(*[fmt(r[c]) for c in cols])
    return table


MEMBER_PARAMS = ("arch", "image_size", "lr", "batch_size", "dropout")


def members_table(
    members: pd.DataFrame, *, title: str | None = None, params: Sequence[str] = MEMBER_PARAMS
) -> Table:
    """Ensemble members (members.parquet rows): weight, best val_loss, val study kappa, config."""
    table = Table(title=title, title_justify="left")
    table.add_column("trial")
    for name in ("weight", "val_loss", "val kappa"):
        table.add_column(name, justify="right")
    shown = [p for p in params if p in members.columns]
    for p in shown:
        table.add_column(p, justify="right")
    for r in members.to_dict("records"):
        table.add_row(
            str(r["trial_id"]),
            fmt(r.get("weight")),
            fmt(r.get("best_val_loss")),
            fmt(r.get("val_study_kappa")),
            *[fmt(r.get(p)) for p in shown],
        )
    return table


def kappa_cell(kappa: Any, low: Any, high: Any) -> str:
    """'0.712 [0.61, 0.80]': a kappa with its interval (:func:`ci_cell`)."""
    return ci_cell(kappa, low, high)


def ensemble_table(
    metrics: pd.DataFrame, *, best: str, split: str, group: str = "body_part",
    title: str | None = None,
) -> Table:
    """Per group (the task's ``group`` column; MURA: body part), the ensemble against the single
    member ``best`` on ``split``: studies, accuracy and kappa with its 95% bootstrap interval
    (category_metrics.parquet rows of one label)."""
    table = Table(title=title, title_justify="left")
    table.add_column(group.replace("_", " "))
    table.add_column("studies", justify="right")
    for who in ("ensemble", "single"):
        table.add_column(f"{who} acc", justify="right")
        table.add_column(f"{who} kappa [95% CI]", justify="right", min_width=18)
    rows = metrics[metrics["split"] == split]
    ens = rows[rows["model"] == "ensemble"].set_index(group)
    one = rows[rows["model"] == best].set_index(group)
    for part, e in ens.iterrows():
        s = one.loc[part] if part in one.index else None
        cells = []
        for r in (e, s):
            if r is None:
                cells += ["-", "-"]
            else:
                kappa = kappa_cell(r["kappa"], r["kappa_low"], r["kappa_high"])
                cells += [fmt(r["accuracy"]), kappa]
        table.add_row(str(part), str(int(e["n_studies"])), *cells)
    return table


def ci_cell(value: Any, low: Any, high: Any) -> str:
    """'0.812 [0.77, 0.85]': a metric with its interval ('-' parts where undefined)."""
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return fmt(value)
    return f"{fmt(value)} [{fmt(low, 2)}, {fmt(high, 2)}]"


def label_table(
    metrics: pd.DataFrame, *, best: str, split: str, group: str = "body_part",
    title: str | None = None,
) -> Table:
    """Per label (label_metrics.parquet rows, the ``ALL`` group of ``split``): studies,
    positives, and ROC AUC and average precision with their 95% intervals for the ensemble and
    the single member ``best``."""
    table = Table(title=title, title_justify="left")
    table.add_column("label")
    table.add_column("studies", justify="right")
    table.add_column("pos", justify="right")
    for who in ("ensemble", "single"):
        table.add_column(f"{who} AUC [95% CI]", justify="right", min_width=18)
        table.add_column(f"{who} AP [95% CI]", justify="right", min_width=18)
    rows = metrics[(metrics["split"] == split) & (metrics[group] == "ALL")]
    ens = rows[rows["model"] == "ensemble"].set_index("label_name")
    one = rows[rows["model"] == best].set_index("label_name")
    for label, e in ens.iterrows():
        cells = []
        for r in (e, one.loc[label] if label in one.index else None):
            if r is None:
                cells += ["-", "-"]
            else:
                cells += [ci_cell(r["auc"], r["auc_low"], r["auc_high"]),
                          ci_cell(r["ap"], r["ap_low"], r["ap_high"])]
        table.add_row(str(label), str(int(e["n_studies"])), str(int(e["n_positive"])), *cells)
    return table


def threshold_table(
    metrics: pd.DataFrame, *, model: str, split: str, group: str = "body_part",
    target: float | None = None, title: str | None = None,
) -> Table:
    """Per label (threshold_metrics.parquet rows of ``model`` and ``split``, the ``ALL``
    group): F1 at each fixed threshold, then the val-chosen threshold with its precision and
    recall (95% interval) and F1."""
    rows = metrics[(metrics["model"] == model) & (metrics["split"] == split)
                   & (metrics[group] == "ALL")]
    fixed = sorted(rows.loc[rows["rule"] == "fixed", "threshold"].unique())
    table = Table(title=title, title_justify="left")
    table.add_column("label")
    for t in fixed:
        table.add_column(f"F1@{t:g}", justify="right")
    sens = f"sens {target:g}" if target is not None else "val-chosen"
    table.add_column(f"t ({sens} on val)", justify="right")
    table.add_column("precision [95% CI]", justify="right", min_width=18)
    table.add_column("recall [95% CI]", justify="right", min_width=18)
    table.add_column("F1", justify="right")
    for label, sub in rows.groupby("label_name", sort=False):
        at = sub[sub["rule"] == "fixed"].set_index("threshold")
        cells = [fmt(at.loc[t, "f1"]) if t in at.index else "-" for t in fixed]
        chosen = sub[sub["rule"] == "val_sensitivity"]
        if chosen.empty:
            cells += ["-", "-", "-", "-"]
        else:
            c = chosen.iloc[0]
            cells += [fmt(c["threshold"]),
                      ci_cell(c["precision"], c["precision_low"], c["precision_high"]),
                      ci_cell(c["recall"], c["recall_low"], c["recall_high"]), fmt(c["f1"])]
        table.add_row(str(label), *cells)
    return table


def triage_table(triage: pd.DataFrame, *, title: str | None = None) -> Table:
    """triage.parquet: per share of the worklist read, the abnormal studies found against a
    random order's expectation, the share of all abnormal studies captured (95% interval) and
    the lift over random."""
    table = Table(title=title, title_justify="left")
    for name in ("first", "studies", "found", "random", "captured [95% CI]", "random captures",
                 "lift [95% CI]"):
        table.add_column(name, justify="right", min_width=18 if "CI" in name else None)
    for r in triage.to_dict("records"):
        table.add_row(
            f"{r['fraction']:.0%}", str(int(r["n_top"])),
            f"{int(r['found'])} of {int(r['n_abnormal'])}", fmt(r["expected_random"], 1),
            ci_cell(r["captured"], r["captured_low"], r["captured_high"]),
            fmt(r["random_captured"]), ci_cell(r["lift"], r["lift_low"], r["lift_high"]),
        )
    return table


def cross_dataset_table(cross: pd.DataFrame, *, title: str | None = None) -> Table:
    """cross_dataset.parquet: per label, AUC and AP (95% intervals) on the home test split and
    on the other dataset, side by side; unshared labels say so."""
    table = Table(title=title, title_justify="left")
    for name in ("label", "other label", "status"):
        table.add_column(name)
    for side in ("home", "other"):
        table.add_column(f"{side} n", justify="right")
        table.add_column(f"{side} AUC [95% CI]", justify="right", min_width=18)
        table.add_column(f"{side} AP [95% CI]", justify="right", min_width=18)
    for r in cross.to_dict("records"):
        cells = []
        for side in ("home", "other"):
            n = r[f"{side}_n_studies"]
            cells += ([str(int(n)),
                       ci_cell(r[f"{side}_auc"], r[f"{side}_auc_low"], r[f"{side}_auc_high"]),
                       ci_cell(r[f"{side}_ap"], r[f"{side}_ap_low"], r[f"{side}_ap_high"])]
                      if n else ["-", "-", "-"])
        table.add_row(fmt(r["label_name"]) if isinstance(r["label_name"], str) else "-",
                      r["other_label_name"] if isinstance(r["other_label_name"], str) else "-",
                      r["status"], *cells)
    return table
