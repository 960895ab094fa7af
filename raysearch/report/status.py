"""Report stage, status: ``raysearch status`` and ``raysearch list`` as Rich renderables, from
:func:`raysearch.experiment.experiment_status` and :func:`raysearch.experiment.list_status`."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from raysearch.experiment import ExperimentStatus
from raysearch.report.tables import fmt

__all__ = ["experiments_table", "status_view"]

_STATE_STYLE = {"finished": "green", "running": "cyan", "interrupted": "yellow",
                "failed": "red", "no_space": "red", "damaged": "red"}


def _trials_line(st: ExperimentStatus) -> str:
    asked = f" of {st.num_samples}" if st.num_samples else ""
    parts = ", ".join(f"{n} {s}" for s, n in st.by_status.items())
    return f"{st.trials}{asked}" + (f" ({parts})" if parts else "")


def _hours(hours: float) -> str:
    """Device-hours with two decimals, or two significant digits below 0.01 (a short CPU search
    spends a few core-seconds: ``0.0016``, where two decimals showed ``0.00``, as if nothing had
    run)."""
    if 0 < hours < 0.01:
        return f"{hours:.2g}" if hours >= 1e-4 else f"{hours:.1e}"
    return f"{hours:.2f}"


def _int(value: Any) -> str:
    try:
        return str(int(value))
    except (TypeError, ValueError):
        return "?"


def status_view(st: ExperimentStatus) -> Group:
    """The experiment's state, trials by status, best so far, epochs and device-hours."""
    state = Text(st.state, style=_STATE_STYLE.get(st.state, ""))
    if st.holder:
        state.append(f" (`raysearch {st.holder.get('command', '?')}`, pid "
                     f"{st.holder.get('pid', '?')} on {st.holder.get('host', '?')}, since "
                     f"{st.holder.get('started', '?')})")
    grid = _Lines()
    grid.add_row("experiment", f"{st.name} ({st.kind}) {st.path}")
    grid.add_row("state", state)
    grid.add_row("trials", _trials_line(st))
    if st.best:
        b: dict[str, Any] = st.best
        what = " ".join(f"{k}={fmt(b[k])}" for k in ("arch", "image_size", "lr") if k in b)
        grid.add_row("best", f"{b.get('trial_id')}: val_loss {fmt(b.get('best_val_loss'), 4)}, "
                     f"kappa {fmt(b.get('val_study_kappa'))} at epoch {_int(b.get('best_epoch'))}"
                     + (f" ({what})" if what else ""))
    grid.add_row("spent", f"{st.epochs} epochs, {_hours(st.device_hours)} {st.device}-hours")
    if st.updated:
        grid.add_row("updated", str(st.updated))
    if st.refit:
        r = st.refit
        b = r["best"]
        grid.add_row("refit", f"{r['configurations']} configurations x {r['folds']} folds "
                     f"({r['runs']} runs, {r['epochs']} epochs, {_hours(r['device_hours'])} "
                     f"{r['device']}-hours); best cv val_loss {fmt(b['cv_val_loss_mean'])} ± "
                     f"{fmt(b['cv_val_loss_sd'])} ({b['trial_id']})")
    if st.ensemble:
        chosen = {"oof": " (selected on out-of-fold predictions)",
                  "val": " (selected on val)"}.get(st.selection or "", "")
        grid.add_row("ensemble", f"{st.path.rstrip('/')}/ensemble{chosen}")
    return grid.group()


class _Lines:
    """``key  value`` lines, the keys bold and padded to one width. Not a Rich grid: a grid pads
    every line to its widest, so piped output (``raysearch status | grep``) carried a run of
    trailing spaces on each line."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str | Text]] = []

    def add_row(self, key: str, value: str | Text) -> None:
        self.rows.append((key, value))

    def group(self) -> Group:
        width = max(len(k) for k, _ in self.rows) + 2
        return Group(*(Text.assemble((key.ljust(width), "bold"), value)
                       for key, value in self.rows))


def experiments_table(frame, *, title: str | None = None) -> Table:
    """One row per experiment (:func:`raysearch.experiment.list_status`)."""
    table = Table(title=title)
    for col, justify in (("name", "left"), ("kind", "left"), ("state", "left"),
                         ("trials", "right"), ("best val_loss", "right"), ("updated (UTC)", "left"),
                         ("note", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for r in frame.itertuples():
        table.add_row(str(r.name), str(r.kind or "?"),
                      Text(str(r.state), style=_STATE_STYLE.get(str(r.state), "")),
                      str(r.trials), fmt(r.best_val_loss, 4), str(r.updated), str(r.note or ""))
    return table
