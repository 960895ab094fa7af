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


def trials_table(
    rows: Iterable[dict[str, Any]], *, title: str | None = None, params: Sequence[str] = KEY_PARAMS
) -> Table:
    """Trials: id, status, epoch, val_loss, best val_loss, val study kappa, key config values."""
    table = Table(title=title, title_justify="left")
    table.add_column("trial")
    table.add_column("status")
    for name in ("epoch", "val_loss", "best", "kappa"):
        table.add_column(name, justify="right")
    rows = list(rows)
    shown = [p for p in params if any(p in r for r in rows)]
    for p in shown:
        table.add_column(p, justify="right")
    for r in rows:
        table.add_row(
            str(r.get("trial_id", "")),
            str(r.get("status", "")),
            fmt(r.get("epoch", r.get("epochs"))),
            fmt(r.get("val_loss")),
            fmt(r.get("best_val_loss")),
            fmt(r.get("val_study_kappa")),
            *[fmt(r.get(p)) for p in shown],
        )
    return table


def best_trials_table(trials: pd.DataFrame, *, n: int = 10, title: str | None = None) -> Table:
    """The ``n`` trials with the lowest best val_loss (trials.parquet rows)."""
    ok = trials[trials["best_val_loss"].notna()].nsmallest(n, "best_val_loss")
    rows = []
    for r in ok.to_dict("records"):
        r = dict(r)
        r["epoch"] = r.get("epochs")
        r["val_loss"] = r.get("best_val_loss")
        rows.append(r)
    return trials_table(rows, title=title)


def epochs_table(epochs: pd.DataFrame, *, title: str | None = None) -> Table:
    """One row per reported epoch of a single trial."""
    table = Table(title=title, title_justify="left")
    cols = ["epoch", "train_loss", "val_loss", "val_auc", "val_study_accuracy", "val_study_kappa",
            "lr", "epoch_time_s", "train_images_per_s"]
    cols = [c for c in cols if c in epochs.columns]
    for c in cols:
        table.add_column(c, justify="right")
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
    """'0.712 [0.61, 0.80]': a kappa with its interval."""
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return fmt(kappa)
    return f"{fmt(kappa)} [{fmt(low, 2)}, {fmt(high, 2)}]"


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
