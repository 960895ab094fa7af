"""One self-contained HTML report of an experiment: its search and its ensembles (``raysearch
report``). Report stage: reads the experiment folder with pandas, draws with matplotlib, fills a
Jinja2 page; never imports ray, train, search or ensemble.

The page works offline: every figure is an SVG embedded as a ``data:`` URI, the only style is
inline, there is no script, and a Content-Security-Policy meta tag forbids every outside load.
Each figure is also written as a standalone SVG in ``<out stem>_figures/``.

Search plots are drawn from ``trials.parquet`` and ``epochs.parquet``, not Optuna's plotting
module: Optuna's plots and importances use COMPLETE trials only, and ASHA-stopped trials are
PRUNED there (../shared/LIBRARIES.md).
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from raysearch.errors import ConfigError, RaysearchError
from raysearch.experiment import experiment_status, read_info
from raysearch.storage import atomic_write_text, exists, get_fs, join, read_bytes, read_parquet

ALL = "ALL"  # raysearch.evaluation.metrics.ALL: the row over every group

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

SECTIONS = (
    ("summary", "1. Summary"),
    ("search", "2. The search"),
    ("ensemble", "3. The ensemble"),
    ("evaluation", "4. Evaluation"),
    ("explanations", "5. Explanations"),
    ("worklist", "6. The triage worklist"),
)

# Rajpurkar et al., "MURA: Large Dataset for Abnormality Detection in Musculoskeletal
# Radiographs", arXiv:1712.06957, Table 2: test-set Cohen's kappa of the baseline ensemble
# (../shared/DOMAIN.md). The best radiologist scored 0.778 overall.
MURA_PAPER_KAPPA = {"ELBOW": 0.710, "FINGER": 0.389, "FOREARM": 0.737, "HAND": 0.851,
                    "HUMERUS": 0.600, "SHOULDER": 0.729, "WRIST": 0.931, ALL: 0.705}
MURA_BEST_RADIOLOGIST = 0.778

STATUS_COLOURS = {"completed": "#1b9e77", "early_stopped": "#7570b3", "pruned": "#d95f02",
                  "failed": "#e7298a", "running": "#66a61e", "pending": "#999999"}

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{{ csp }}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>raysearch report: {{ name }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.88em; }
td, th { border: 1px solid #ccc; padding: 2px 7px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; } figcaption { font-size: 0.85em; color: #555; max-width: 560px; }
.gap { color: #a33; font-style: italic; } .note { color: #555; font-size: 0.9em; }
nav a { margin-right: 1em; }
</style>
</head>
<body>
<h1>raysearch report: {{ name }}</h1>
<p class="note">{{ path }} &middot; made {{ made }} by raysearch {{ version }}</p>
<nav>{% for id, title in sections %}<a href="#{{ id }}">{{ title }}</a>{% endfor %}</nav>
{% for s in blocks %}
<section id="{{ s.id }}">
<h2>{{ s.title }}</h2>
{% for item in s.items %}
{% if item.kind == "h3" %}<h3>{{ item.text }}</h3>
{% elif item.kind == "p" %}<p>{{ item.text }}</p>
{% elif item.kind == "gap" %}<p class="gap">{{ item.text }}</p>
{% elif item.kind == "table" %}{{ item.html | safe }}
{% elif item.kind == "figure" %}<figure><img src="{{ item.uri }}" alt="{{ item.alt }}" width="{{ item.width }}"><figcaption>{{ item.caption }} <span class="note">({{ item.file }})</span></figcaption></figure>
{% endif %}
{% endfor %}
</section>
{% endfor %}
</body>
</html>
"""


@dataclass
class _Block:
    id: str
    title: str
    items: list[dict[str, Any]] = field(default_factory=list)


class _Report:
    """Collects figures (SVG text by file name) and page items section by section."""

    def __init__(self) -> None:
        self.figures: dict[str, str] = {}
        self.blocks: list[_Block] = []

    def section(self, sid: str, title: str) -> _Block:
        self.blocks.append(_Block(sid, title))
        return self.blocks[-1]

    def figure(self, block: _Block, fig, name: str, *, alt: str, caption: str) -> None:
        import matplotlib.pyplot as plt

        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
        plt.close(fig)
        svg = buf.getvalue()
        fname = _slug(name) + ".svg"
        self.figures[fname] = svg
        uri = "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
        width = int(fig.get_size_inches()[0] * 80)
        block.items.append({"kind": "figure", "uri": uri, "alt": alt, "caption": caption,
                            "file": fname, "width": width})


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text).strip("_")[:80]


def _p(block: _Block, text: str, kind: str = "p") -> None:
    block.items.append({"kind": kind, "text": text})


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) \
            else f"{value:.{digits}f}"
    return str(value)


def _table(block: _Block, frame: pd.DataFrame, *, digits: int = 3) -> None:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v, digits))}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    block.items.append({"kind": "table", "html": f"<table><tr>{head}</tr>{rows}</table>"})


def _read(path: str) -> pd.DataFrame | None:
    return read_parquet(path) if exists(path) else None


def _ensemble_dirs(exp_dir: str) -> list[str]:
    """Every folder directly under the experiment that holds an ``ensemble.json``; ``ensemble``
    first, then by name."""
    fs, root = get_fs(exp_dir)
    found = sorted(p.rstrip("/").rsplit("/", 2)[-2]
                   for p in fs.glob(root.rstrip("/") + "/*/ensemble.json"))
    found.sort(key=lambda n: (n != "ensemble", n))
    return [join(exp_dir, n) for n in found]


# ----------------------------------------------------------------------------- entry point


def build_report(exp_dir: str, *, out: str | None = None) -> tuple[str, dict[str, Any]]:
    """Write the HTML report of the experiment at ``exp_dir``.

    ``out`` defaults to ``<exp_dir>/report.html``; the figures go to ``<out stem>_figures/``.
    Returns (path written, {"figures": n, "bytes": size, "seconds": render time}).
    Raises ConfigError when ``exp_dir`` holds no experiment.json.
    """
    import jinja2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = time.perf_counter()
    if not exists(join(exp_dir, "experiment.json")):
        raise ConfigError(f"no experiment at {exp_dir} (no experiment.json)")
    out = out or join(exp_dir, "report.html")
    info = read_info(exp_dir)
    with plt.rc_context({"svg.hashsalt": "raysearch", "svg.fonttype": "none",
                         "font.size": 9, "axes.titlesize": 9}):
        rep = _Report()
        trials = _read(join(exp_dir, "trials.parquet"))
        epochs = _read(join(exp_dir, "epochs.parquet"))
        ens_dirs = _ensemble_dirs(exp_dir)
        ensembles = [(d, _load_ensemble(d)) for d in ens_dirs]
        _summary(rep, exp_dir, info, trials, ensembles)
        _search(rep, exp_dir, trials, epochs)
        _ensemble_section(rep, ensembles)
        _evaluation(rep, info, ensembles)
        _explanations(rep, exp_dir, ens_dirs)
        _worklist(rep, ensembles)
    from raysearch import __version__

    page = jinja2.Environment(autoescape=True).from_string(PAGE).render(
        csp=CSP, name=info.get("name") or exp_dir.rstrip("/").rsplit("/", 1)[-1],
        path=exp_dir, made=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        version=__version__, sections=SECTIONS, blocks=rep.blocks,
    )
    stem = out.removesuffix(".html")
    fig_dir = stem + "_figures"
    for fname, svg in rep.figures.items():
        atomic_write_text(join(fig_dir, fname), svg)
    atomic_write_text(out, page)
    return out, {"figures": len(rep.figures), "bytes": len(page.encode()),
                 "seconds": time.perf_counter() - start, "figure_dir": fig_dir}


def _load_ensemble(d: str) -> dict[str, Any]:
    import json

    ens: dict[str, Any] = {"json": json.loads(read_bytes(join(d, "ensemble.json")))}
    for name in ("members", "study_predictions", "image_predictions", "category_metrics",
                 "label_metrics", "threshold_metrics", "triage", "worklist"):
        ens[name] = _read(join(d, f"{name}.parquet"))
    if ens["worklist"] is None and exists(join(d, "worklist.csv")):
        ens["worklist"] = pd.read_csv(io.BytesIO(read_bytes(join(d, "worklist.csv"))))
    return ens


def _group_col(frame: pd.DataFrame, info: dict[str, Any]) -> str | None:
    group = (info.get("task") or {}).get("group") or "body_part"
    if group in frame.columns:
        return group
    return next((c for c in ("body_part", "view") if c in frame.columns), None)


def _labels(frame: pd.DataFrame) -> list[str | None]:
    return sorted(frame["label_name"].dropna().unique()) if "label_name" in frame.columns \
        else [None]


def _of_label(frame: pd.DataFrame, label: str | None) -> pd.DataFrame:
    return frame if label is None else frame[frame["label_name"] == label]


# ----------------------------------------------------------------------------- 1. summary


def _summary(rep: _Report, exp_dir: str, info: dict, trials, ensembles) -> None:
    b = rep.section(*SECTIONS[0])
    task = info.get("task") or {}
    data = info.get("data") or {}
    rows = [("experiment", info.get("name")), ("state", info.get("state")),
            ("task", task.get("name")), ("labels", ", ".join(task.get("labels") or [])),
            ("groups", ", ".join(task.get("groups") or [])),
            ("data root", data.get("root")), ("val fraction", data.get("val_fraction")),
            ("split seed", data.get("seed"))]
    manifest = _read(join(exp_dir, "manifest.parquet"))
    if manifest is not None and "split" in manifest.columns:
        for split, n in manifest.groupby("split")["study_id"].nunique().items():
            rows.append((f"{split} studies", int(n)))
        for split, n in manifest["split"].value_counts().sort_index().items():
            rows.append((f"{split} images", int(n)))
    try:
        st = experiment_status(exp_dir)
        rows += [("trials", f"{st.trials} of {st.num_samples}"),
                 ("by status", ", ".join(f"{k} {v}" for k, v in sorted(st.by_status.items()))),
                 ("epochs run", st.epochs),
                 (f"{st.device}-hours", f"{st.device_hours:.3f}")]
    except (RaysearchError, OSError, ValueError, KeyError) as e:  # a damaged folder: gap labelled
        rows.append(("compute", f"unknown ({type(e).__name__}: {e})"))
    _table(b, pd.DataFrame(rows, columns=["", "value"]))
    space = _space(exp_dir)
    if space:
        _p(b, "Searched space (search_space.yaml):", "h3")
        _table(b, pd.DataFrame([(k, _describe(v)) for k, v in space.items()],
                               columns=["parameter", "distribution"]))
    if not ensembles:
        _p(b, "No ensemble yet: `raysearch ensemble --experiment X` makes one.", "gap")
        return
    d, ens = ensembles[0]
    cm = ens["category_metrics"]
    if cm is None:
        _p(b, f"{d}: no category_metrics.parquet.", "gap")
        return
    group = _group_col(cm, info)
    overall = cm[cm[group] == ALL] if group else cm
    _p(b, f"Ensemble ({d.rsplit('/', 1)[-1]}) against its best single member, over all "
          "groups (Cohen's kappa with its bootstrap 95% CI, ROC AUC):", "h3")
    # The single member to beat is chosen on the selection set (val, or oof), never on test,
    # and the same member is shown on every split.
    chosen = _best_member(cm, group)
    rows = []
    for split in sorted(overall["split"].unique()):
        sub = overall[overall["split"] == split]
        for label in _labels(sub):
            s = _of_label(sub, label)
            ens_row = s[s["model"] == "ensemble"]
            mem = s[s["model"] == chosen]
            if ens_row.empty:
                continue
            e = ens_row.iloc[0]
            best = mem.iloc[0] if len(mem) else None
            rows.append((split, label or "", _ci(e.kappa, e.kappa_low, e.kappa_high), e.auc,
                         best.model if best is not None else "n/a",
                         _ci(best.kappa, best.kappa_low, best.kappa_high)
                         if best is not None else "n/a",
                         best.auc if best is not None else float("nan")))
    _table(b, pd.DataFrame(rows, columns=["split", "label", "ensemble kappa", "ensemble AUC",
                                          "best member", "member kappa", "member AUC"]))
    if task.get("name") == "mura" and group:
        _p(b, "MURA references (Rajpurkar et al., arXiv:1712.06957): the paper's baseline "
              "ensemble of 5 DenseNet-169 on its hidden 207-study test set; the best "
              f"radiologist scored {MURA_BEST_RADIOLOGIST} overall. Different test sets: a "
              "guide, not a match.", "h3")
        test = cm[(cm["model"] == "ensemble") & (cm["split"] == "test")].set_index(group)
        rows = [(g, test["kappa"].get(g, float("nan")), ref)
                for g, ref in MURA_PAPER_KAPPA.items()]
        _table(b, pd.DataFrame(rows, columns=["body part", "this ensemble (test)",
                                              "MURA paper ensemble"]))


def _ci(v, lo, hi) -> str:
    return f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"


def _space(exp_dir: str) -> dict[str, Any]:
    import yaml

    path = join(exp_dir, "search_space.yaml")
    if not exists(path):
        return {}
    doc = yaml.safe_load(read_bytes(path)) or {}
    return dict(doc.get("space") or {})


def _describe(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}: {w}" for k, w in v.items())
    return str(v)


def _searched(space: dict[str, Any], trials: pd.DataFrame) -> list[str]:
    """Parameters that vary in the space (not constants) and have a trials.parquet column."""
    out = []
    for k, v in space.items():
        if isinstance(v, dict) and "constant" in v:
            continue
        if k in trials.columns and trials[k].nunique(dropna=True) > 0:
            out.append(k)
    return out


# ----------------------------------------------------------------------------- 2. search


def _search(rep: _Report, exp_dir: str, trials, epochs) -> None:
    import matplotlib.pyplot as plt

    b = rep.section(*SECTIONS[1])
    if trials is None or trials.empty:
        _p(b, "No trials.parquet: the search has written no results yet.", "gap")
        return
    have_epochs = epochs is not None and not epochs.empty and "val_loss" in epochs.columns
    status = trials.set_index("trial_id")["status"].astype(str).to_dict()
    if have_epochs:
        ep = epochs.sort_values(["reported_at", "trial_id", "epoch"]
                                if "reported_at" in epochs.columns else ["trial_id", "epoch"])
        ep = ep.reset_index(drop=True)
        ep["cum_epochs"] = np.arange(1, len(ep) + 1)
        ep["best_so_far"] = ep["val_loss"].cummin()
        last = ep.groupby("trial_id").tail(1)
        stopped = last[last["trial_id"].map(status).isin(["pruned", "early_stopped"])]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        ax = axes[0]
        ax.step(ep["cum_epochs"], ep["best_so_far"], where="post", color="k", label="best val loss")
        ax.scatter(ep["cum_epochs"], ep["val_loss"], s=8, color="#bbb", label="each epoch")
        for st, mk in (("pruned", "v"), ("early_stopped", "x")):
            s = stopped[stopped["trial_id"].map(status) == st]
            ax.scatter(s["cum_epochs"], s["val_loss"], marker=mk, s=40,
                       color=STATUS_COLOURS[st], label=f"{st} (ASHA stop)" if st == "pruned"
                       else "early stopped")
        ax.set_xlabel("cumulative epochs (all trials)")
        ax.set_ylabel("val loss")
        ax.legend(fontsize=7)
        ax = axes[1]
        if "reported_at" in ep.columns:
            t = pd.to_datetime(ep["reported_at"], utc=True, errors="coerce")
            minutes = (t - t.min()).dt.total_seconds() / 60
            ax.step(minutes, ep["best_so_far"], where="post", color="k")
            ax.set_xlabel("wall time since the first epoch (min)")
        ax.set_ylabel("best val loss so far")
        rep.figure(b, fig, "search_progress", alt="best validation loss against cumulative "
                   "epochs and wall time, ASHA stops marked",
                   caption="Best val loss against cumulative epochs (left; triangles: trials "
                   "ASHA stopped) and wall time (right).")
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for tid, g in ep.sort_values("epoch").groupby("trial_id"):
            st = status.get(tid, "unknown")
            ax.plot(g["epoch"], g["val_loss"], marker=".", lw=1,
                    color=STATUS_COLOURS.get(st, "#444"), alpha=0.8)
        for st, c in STATUS_COLOURS.items():
            if st in set(status.values()):
                ax.plot([], [], color=c, label=st)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val loss")
        ax.legend(fontsize=7)
        rep.figure(b, fig, "learning_curves", alt="validation loss per epoch of every trial, "
                   "coloured by outcome", caption="Learning curves of every trial, coloured by "
                   "outcome.")
    else:
        _p(b, "No epochs.parquet: no learning curves.", "gap")
    failed = trials[trials["status"] == "failed"]
    if len(failed):
        _p(b, f"{len(failed)} failed trial(s): " + "; ".join(
            f"{r.trial_id}: {str(r.error)[:120]}" for r in failed.itertuples()), "gap")
    cols = [c for c in ("trial_id", "status", "epochs", "best_val_loss", "val_study_kappa",
                        "wall_time_s") if c in trials.columns]
    space = _space(exp_dir)
    params = _searched(space, trials) if space else []
    _table(b, trials.sort_values("best_val_loss")[cols + params])
    if not params:
        _p(b, "No searched parameters found (search_space.yaml missing or all constant).", "gap")
        return
    ok = trials.dropna(subset=["best_val_loss"])
    n = len(params)
    ncol = min(3, n)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.7 * nrow), squeeze=False)
    for ax, p in zip(axes.flat, params):
        x, ticks = _axis_values(ok[p])
        for st, c in STATUS_COLOURS.items():
            m = ok["status"] == st
            ax.scatter(x[m.to_numpy()], ok.loc[m, "best_val_loss"], s=18, color=c, label=st)
        if ticks is not None:
            ax.set_xticks(range(len(ticks)), ticks, rotation=30, fontsize=7)
        elif _log_scale(space.get(p)):
            ax.set_xscale("log")
        ax.set_xlabel(p)
        ax.set_ylabel("best val loss")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    rep.figure(b, fig, "slices", alt="best validation loss against each searched parameter",
               caption="One slice per searched parameter: each trial's best val loss (every "
               "trial, pruned ones included).")
    _parallel(rep, b, ok, params, space)
    _importance(rep, b, trials, epochs if have_epochs else None, params)


def _axis_values(col: pd.Series) -> tuple[np.ndarray, list[str] | None]:
    """Numbers to plot: numeric columns as they are, others as category positions."""
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        return col.to_numpy(dtype=float), None
    cats = sorted(col.astype(str).unique())
    return col.astype(str).map({c: i for i, c in enumerate(cats)}).to_numpy(dtype=float), cats


def _log_scale(spec: Any) -> bool:
    return isinstance(spec, dict) and any(k.startswith("log") for k in spec)


def _parallel(rep: _Report, b: _Block, ok: pd.DataFrame, params: list[str],
              space: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    if len(params) < 2 or len(ok) < 2:
        return
    cols = []
    for p in params:
        x, _ = _axis_values(ok[p])
        if _log_scale(space.get(p)) and np.all(x > 0):
            x = np.log10(x)
        lo, hi = np.nanmin(x), np.nanmax(x)
        cols.append((x - lo) / (hi - lo) if hi > lo else np.full_like(x, 0.5))
    y = ok["best_val_loss"].to_numpy(dtype=float)
    norm = plt.Normalize(np.nanmin(y), np.nanmax(y))
    fig, ax = plt.subplots(figsize=(1.4 * len(params) + 2, 3.2))
    for i in np.argsort(-y):
        ax.plot(range(len(params)), [c[i] for c in cols], color=plt.cm.viridis_r(norm(y[i])),
                lw=1.2, alpha=0.85)
    ax.set_xticks(range(len(params)), params, rotation=20)
    ax.set_yticks([0, 1], ["min", "max"])
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis_r"), ax=ax,
                 label="best val loss")
    rep.figure(b, fig, "parallel_coordinates", alt="parallel coordinates of the configurations",
               caption="Parallel coordinates: each line a trial, each axis a parameter scaled to "
               "its range (categories in sorted order), coloured by best val loss.")


def _importance(rep: _Report, b: _Block, trials: pd.DataFrame, epochs, params: list[str]) -> None:
    """Random-forest (mean decrease in impurity) importance of each parameter for val loss at
    one rung, over every trial that reached it (scikit-learn RandomForestRegressor, Breiman
    2001)."""
    import matplotlib.pyplot as plt
    from sklearn.ensemble import RandomForestRegressor

    if epochs is None:
        _p(b, "Parameter importance needs epochs.parquet.", "gap")
        return
    reached = epochs.groupby("epoch")["trial_id"].nunique()
    rungs = [int(e) for e, n in reached.items() if n >= 4]
    if not rungs:
        _p(b, f"Parameter importance: no epoch was reached by 4 trials or more ({len(trials)} "
              "trial(s)).", "gap")
        return
    # The highest epoch that at least half the trials at epoch 1 reached (ASHA's first rungs).
    need = max(4, math.ceil(reached.max() / 2))
    rung = max([r for r in rungs if reached[r] >= need] or [min(rungs)])
    at = epochs[epochs["epoch"] == rung][["trial_id", "val_loss"]].dropna()
    frame = at.merge(trials[["trial_id", *params]], on="trial_id")
    X = np.column_stack([_axis_values(frame[p])[0] for p in params])
    X = np.nan_to_num(X, nan=-1.0)
    varying = [i for i in range(len(params)) if np.unique(X[:, i]).size > 1]
    if not varying or len(frame) < 4:
        _p(b, "Parameter importance: no parameter varies among the trials at the rung.", "gap")
        return
    forest = RandomForestRegressor(n_estimators=300, random_state=0, min_samples_leaf=1)
    forest.fit(X[:, varying], frame["val_loss"].to_numpy())
    names = [params[i] for i in varying]
    imp = forest.feature_importances_
    order = np.argsort(imp)
    fig, ax = plt.subplots(figsize=(5, 0.35 * len(names) + 1.2))
    ax.barh([names[i] for i in order], imp[order], color="#4477aa")
    ax.set_xlabel("importance (share of impurity decrease)")
    rep.figure(b, fig, "importance", alt="parameter importance at one rung",
               caption=f"Parameter importance for val loss at epoch {rung}, over all "
               f"{len(frame)} trials that reached it (pruned ones included): scikit-learn "
               "random forest, 300 trees, mean decrease in impurity. Few trials make it rough.")


# ----------------------------------------------------------------------------- 3. ensemble


def _ensemble_section(rep: _Report, ensembles) -> None:
    import matplotlib.pyplot as plt

    b = rep.section(*SECTIONS[2])
    if not ensembles:
        _p(b, "No ensemble yet: run `raysearch ensemble --experiment X`.", "gap")
        return
    for d, ens in ensembles:
        name = d.rstrip("/").rsplit("/", 1)[-1]
        j = ens["json"]
        _p(b, f"{name}: method {j.get('method')}, selection on {j.get('selection', 'val')}, "
              f"threshold {_fmt(j.get('threshold'))} ({j.get('threshold_rule', '')})", "h3")
        m = ens["members"]
        if m is None or m.empty:
            _p(b, "no members.parquet", "gap")
            continue
        cols = [c for c in ("rank", "trial_id", "weight", "picks", "best_val_loss",
                            "val_study_kappa", "status", "arch", "image_size", "lr", "dropout")
                if c in m.columns]
        _table(b, m[cols])
        losses = _val_log_losses(ens["study_predictions"], m)
        fig, axes = plt.subplots(1, 2 if losses else 1, figsize=(9 if losses else 4.5,
                                 0.3 * len(m) + 1.4), squeeze=False)
        ax = axes[0][0]
        ax.barh(m["trial_id"].astype(str)[::-1], m["weight"][::-1], color="#228833")
        ax.set_xlabel("weight")
        if losses:
            ax = axes[0][1]
            names = list(losses)
            ax.barh(names[::-1], [losses[n] for n in names][::-1],
                    color=["#c00" if n == "ensemble" else "#888" for n in names][::-1])
            ax.set_xlabel("val study log loss")
            ax.set_xlim(min(losses.values()) * 0.95, max(losses.values()) * 1.02)
        fig.tight_layout()
        rep.figure(b, fig, f"{name}_weights", alt=f"member weights and val log loss of {name}",
                   caption=f"Member weights of {name}; right: the study-level log loss on the "
                   "selection split (val or oof) of each member and of the ensemble (red).")
        path = j.get("selection_path") or []
        if path:
            fig, ax = plt.subplots(figsize=(max(4.5, 0.6 * len(path) + 2), 3))
            rounds = [p["round"] for p in path]
            loss = [p["val_study_log_loss"] for p in path]
            ax.plot(rounds, loss, "o-", color="#004488")
            for r, l, p in zip(rounds, loss, path):
                ax.annotate(str(p["added"]), (r, l), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=7, rotation=30)
            ax.set_xlabel("members added (greedy: rounds, top: rank order)")
            ax.set_ylabel(f"{j.get('selection', 'val')} study log loss")
            ax.set_xticks(rounds)
            fig.tight_layout()
            rep.figure(b, fig, f"{name}_selection_path",
                       alt=f"how the selection score of {name} grew with each member added",
                       caption=f"How {name}'s score on its selection set ({j.get('selection', 'val')}"
                       ") moved with each member added, each point labelled with the member "
                       "added (ensemble.json's selection_path).")
        else:
            _p(b, f"{name}: its ensemble.json has no selection_path (made by an earlier "
                  "release): run `raysearch ensemble` again to see how selection grew.", "gap")


def _val_log_losses(st, members: pd.DataFrame) -> dict[str, float]:
    """Study-level binary log loss (sklearn.metrics.log_loss, averaged over labels for
    multi-label tasks) on the selection split of the ensemble and of each member."""
    from sklearn.metrics import log_loss

    if st is None:
        return {}
    sel = st[st["split"] == ("oof" if "oof" in set(st["split"]) else "val")]
    sel = sel.dropna(subset=["label"])
    if sel.empty or sel["label"].nunique() < 2:
        return {}
    cols = {"ensemble": "prob", **{t: f"prob_{t}" for t in members["trial_id"].astype(str)}}
    out = {}
    for name, col in cols.items():
        if col in sel.columns:
            p = sel[col].clip(1e-7, 1 - 1e-7)
            out[name] = float(log_loss(sel["label"].astype(int), p, labels=[0, 1]))
    return out


# ----------------------------------------------------------------------------- 4. evaluation


def _evaluation(rep: _Report, info: dict, ensembles) -> None:
    b = rep.section(*SECTIONS[3])
    if not ensembles:
        _p(b, "No ensemble yet: nothing to evaluate.", "gap")
        return
    for d, ens in ensembles:
        name = d.rstrip("/").rsplit("/", 1)[-1]
        st = ens["study_predictions"]
        if st is None or st.empty:
            _p(b, f"{name}: no study_predictions.parquet.", "gap")
            continue
        group = _group_col(st, info)
        cm = ens["category_metrics"]
        best = _best_member(cm, group)
        for split in [s for s in ("val", "oof", "test") if s in set(st["split"])] + \
                sorted(set(st["split"]) - {"val", "oof", "test"}):
            for label in _labels(st):
                tag = f"{name} / {split}" + (f" / {label}" if label else "")
                _p(b, tag, "h3")
                sub = _of_label(st[st["split"] == split], label)
                _curves(rep, b, sub, group, best, tag)
                if cm is not None:
                    _forest(rep, b, _of_label(cm[cm["split"] == split], label), group, tag)
                    _confusions(rep, b, _of_label(cm[(cm["split"] == split)
                                                     & (cm["model"] == "ensemble")], label),
                                group, tag, ens["image_predictions"], split, label,
                                ens["json"].get("threshold"), sub)
                _reliability(rep, b, sub, tag)
                tm = ens["threshold_metrics"]
                if tm is not None:
                    t = _of_label(tm[(tm["split"] == split) & (tm["model"] == "ensemble")
                                     & (tm["rule"] == "fixed")], label)
                    if group in t.columns:
                        t = t[t[group] == ALL]
                    if len(t):
                        _p(b, "Precision, recall and F1 (bootstrap 95% CI) at fixed "
                              "thresholds, all groups:")
                        _table(b, pd.DataFrame({
                            "threshold": t["threshold"],
                            "precision": [_ci(*r) for r in t[["precision", "precision_low",
                                                              "precision_high"]].to_numpy()],
                            "recall": [_ci(*r) for r in t[["recall", "recall_low",
                                                           "recall_high"]].to_numpy()],
                            "F1": [_ci(*r) for r in t[["f1", "f1_low", "f1_high"]].to_numpy()],
                            "specificity": t["specificity"]}))


def _best_member(cm, group) -> str | None:
    """The member with the highest kappa on the selection set (``val``, or ``oof`` for an
    ``ensemble --oof``), over all groups: the single model an ensemble is compared with."""
    if cm is None:
        return None
    selection = "oof" if "oof" in set(cm["split"]) else "val"
    m = cm[(cm["model"] != "ensemble") & (cm["split"] == selection)]
    if group:
        m = m[m[group] == ALL]
    if m.empty:
        return None
    return str(m.groupby("model")["kappa"].mean().sort_values(ascending=False).index[0])


def _curves(rep, b, sub: pd.DataFrame, group, best, tag) -> None:
    import matplotlib.pyplot as plt
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    if sub.empty or sub["label"].nunique() < 2:
        _p(b, f"{tag}: ROC and PR need both classes; this split has "
              f"{sub['label'].nunique()} class(es).", "gap")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    parts = [(ALL, sub)] + ([(g, s) for g, s in sub.groupby(group)] if group else [])
    for g, s in parts:
        if s["label"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(s["label"], s["prob"])
        prec, rec, _ = precision_recall_curve(s["label"], s["prob"])
        lw = 2.2 if g == ALL else 1
        ax1.plot(fpr, tpr, lw=lw, label=f"{g} AUC {auc(fpr, tpr):.3f}")
        ax2.plot(rec, prec, lw=lw,
                 label=f"{g} AP {average_precision_score(s['label'], s['prob']):.3f}")
    col = f"prob_{best}" if best else None
    if col and col in sub.columns:
        fpr, tpr, _ = roc_curve(sub["label"], sub[col])
        ax1.plot(fpr, tpr, "k--", lw=1.2, label=f"best member {best} AUC {auc(fpr, tpr):.3f}")
        prec, rec, _ = precision_recall_curve(sub["label"], sub[col])
        ax2.plot(rec, prec, "k--", lw=1.2, label=f"best member {best}")
    ax1.plot([0, 1], [0, 1], ":", color="#999")
    ax1.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, {tag}")
    ax2.set(xlabel="recall", ylabel="precision", title=f"precision-recall, {tag}")
    ax1.legend(fontsize=6)
    ax2.legend(fontsize=6)
    rep.figure(b, fig, f"roc_pr_{tag}", alt=f"ROC and precision-recall curves, {tag}",
               caption=f"ROC and PR curves of the ensemble per group and overall (thick), the "
               f"best single member dashed; study level, {tag}.")


def _forest(rep, b, cm: pd.DataFrame, group, tag) -> None:
    import matplotlib.pyplot as plt

    if cm.empty or not group:
        return
    groups = [g for g in cm[group].unique() if g != ALL] + [ALL]
    models = ["ensemble"] + [m for m in cm["model"].unique() if m != "ensemble"]
    fig, ax = plt.subplots(figsize=(6.5, 0.32 * len(groups) * min(len(models), 3) + 1.2))
    y = 0
    ticks, labels = [], []
    for g in groups[::-1]:
        for k, m in enumerate(models[:3]):
            r = cm[(cm[group] == g) & (cm["model"] == m)]
            if r.empty:
                continue
            r = r.iloc[0]
            colour = "#c00" if m == "ensemble" else "#888"
            if not math.isnan(r.kappa):
                lo = r.kappa - r.kappa_low if not math.isnan(r.kappa_low) else 0
                hi = r.kappa_high - r.kappa if not math.isnan(r.kappa_high) else 0
                ax.errorbar(r.kappa, y, xerr=[[lo], [hi]], fmt="o", color=colour, ms=4,
                            capsize=2)
            else:
                ax.text(0, y, "kappa undefined", fontsize=6, va="center", color="#a33")
            ticks.append(y)
            labels.append(f"{g} · {m}")
            y += 1
        y += 0.5
    ax.set_yticks(ticks, labels, fontsize=6)
    ax.axvline(0, color="#999", lw=0.8)
    ax.set_xlabel("Cohen's kappa (bootstrap 95% CI)")
    rep.figure(b, fig, f"kappa_forest_{tag}", alt=f"forest plot of kappa per group, {tag}",
               caption=f"Cohen's kappa per group with its bootstrap 95% CI: ensemble (red) and "
               f"up to two members (grey), {tag}.")


def _counts(y: np.ndarray, p: np.ndarray) -> pd.Series:
    return pd.Series({"tp": int(((y == 1) & (p == 1)).sum()), "fp": int(((y == 0) & (p == 1)).sum()),
                      "tn": int(((y == 0) & (p == 0)).sum()), "fn": int(((y == 1) & (p == 0)).sum())})


def _confusions(rep, b, cm: pd.DataFrame, group, tag, images, split, label, threshold,
                studies: pd.DataFrame) -> None:
    """Confusion matrices at study level (category_metrics.parquet), image level (each image's
    own prediction) and patient level (a patient is abnormal when any of their studies is, and
    called abnormal when any of their studies is called so)."""
    import matplotlib.pyplot as plt

    if cm.empty:
        return
    groups = [ALL] + ([g for g in cm[group].unique() if g != ALL] if group else [])
    levels = [("study", {g: cm[cm[group] == g].iloc[0] if group else cm.iloc[0]
                         for g in groups if not group or len(cm[cm[group] == g])})]
    if images is not None and "pred" in images.columns:
        im = _of_label(images[images["split"] == split], label)
        counts = {}
        for g in groups:
            s = im if g == ALL or not group or group not in im.columns else im[im[group] == g]
            counts[g] = _counts(s["label"].to_numpy(), s["pred"].to_numpy())
        levels.append(("image", counts))
    if "patient_id" in studies.columns and "pred" in studies.columns and len(studies):
        counts = {}
        for g in groups:
            s = studies if g == ALL or not group or group not in studies.columns \
                else studies[studies[group] == g]
            pt = s.groupby("patient_id")[["label", "pred"]].max()
            counts[g] = _counts(pt["label"].to_numpy(), pt["pred"].to_numpy())
        levels.append(("patient", counts))
    ncol = len(groups)
    fig, axes = plt.subplots(len(levels), ncol, figsize=(1.5 * ncol + 0.6, 1.95 * len(levels)),
                             squeeze=False)
    for li, (level, rows) in enumerate(levels):
        for gi, g in enumerate(groups):
            ax = axes[li][gi]
            r = rows.get(g)
            if r is None:
                ax.axis("off")
                continue
            mat = np.array([[r["tn"], r["fp"]], [r["fn"], r["tp"]]], dtype=float)
            ax.imshow(mat, cmap="Blues", vmin=0, vmax=max(mat.max(), 1))
            for i in range(2):
                for j in range(2):
                    dark = mat[i, j] > 0.6 * mat.max()
                    ax.text(j, i, int(mat[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
            ax.set_xticks([0, 1], ["pred 0", "pred 1"], fontsize=6)
            ax.set_yticks([0, 1], ["true 0", "true 1"] if gi == 0 else ["", ""], fontsize=6)
            ax.set_title(f"{g} ({level})", fontsize=7)
    fig.tight_layout()
    rep.figure(b, fig, f"confusion_{tag}", alt=f"confusion matrices by group, {tag}",
               caption=f"Confusion matrices of the ensemble at study, image and patient level "
               "(a patient: any study), "
               f"threshold {_fmt(threshold)}, {tag}.")


def _reliability(rep, b, sub: pd.DataFrame, tag, bins: int = 10) -> None:
    """Reliability diagram and expected calibration error over ``bins`` equal-width bins:
    ECE = sum_b n_b / N * |mean label_b - mean prob_b| (Naeini et al., AAAI 2015; Guo et al.,
    ICML 2017)."""
    import matplotlib.pyplot as plt

    if sub.empty:
        return
    p = sub["prob"].to_numpy(dtype=float)
    y = sub["label"].to_numpy(dtype=float)
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    conf, acc, n = [], [], []
    for k in range(bins):
        m = idx == k
        if m.any():
            conf.append(p[m].mean())
            acc.append(y[m].mean())
            n.append(m.sum())
    conf, acc, n = map(np.asarray, (conf, acc, n))
    ece = float(np.sum(n / n.sum() * np.abs(acc - conf)))
    fig, ax = plt.subplots(figsize=(3.8, 3.6))
    ax.plot([0, 1], [0, 1], ":", color="#999")
    ax.plot(conf, acc, "o-", color="#c00")
    for c, a, k in zip(conf, acc, n):
        ax.annotate(str(k), (c, a), fontsize=6, xytext=(3, -8), textcoords="offset points")
    ax.set(xlabel="mean predicted probability", ylabel="fraction abnormal", xlim=(0, 1),
           ylim=(0, 1), title=f"ECE {ece:.3f}")
    rep.figure(b, fig, f"reliability_{tag}", alt=f"reliability diagram, {tag}",
               caption=f"Reliability diagram, {bins} equal-width bins (studies per bin shown); "
               f"expected calibration error {ece:.3f}; {tag}.")


# ----------------------------------------------------------------------------- 5. explanations


def _explanations(rep: _Report, exp_dir: str, ens_dirs: list[str]) -> None:
    """Tables of ``explanations.parquet`` and ``audit.parquet`` wherever ``raysearch explain``
    wrote them under the experiment, with a gallery of the PNG overlays they name (columns whose
    values end in ``.png``; relative paths are taken from the parquet's folder)."""
    b = rep.section(*SECTIONS[4])
    found = 0
    fs, root = get_fs(exp_dir)
    scheme = exp_dir.split("://")[0] + "://" if "://" in exp_dir else ""
    for name in ("explanations.parquet", "audit.parquet"):
        for p in sorted(fs.glob(root.rstrip("/") + f"/**/{name}"))[:4]:
            path = scheme + p
            frame = read_parquet(path)
            found += 1
            folder = path.rsplit("/", 1)[0]
            _p(b, f"{p[len(root.rstrip('/')) + 1:]} ({len(frame)} rows)", "h3")
            _table(b, frame.head(20))
            pngs = [v for c in frame.columns if pd.api.types.is_string_dtype(frame[c])
                    for v in frame[c].dropna().astype(str) if v.lower().endswith(".png")]
            shown = 0
            for v in pngs:
                if shown >= 12:
                    break
                full = v if (v.startswith("/") or "://" in v) else join(folder, v)
                if not exists(full):
                    continue
                uri = "data:image/png;base64," + base64.b64encode(read_bytes(full)).decode()
                b.items.append({"kind": "figure", "uri": uri, "alt": f"overlay {v}",
                                "caption": v, "file": v.rsplit("/", 1)[-1], "width": 220})
                shown += 1
            if pngs and not shown:
                _p(b, f"{name} names {len(pngs)} PNG file(s), none of them found.", "gap")
    if not found:
        _p(b, "No explanations: explanations.parquet and audit.parquet are absent "
              "(`raysearch explain` writes them).", "gap")


# ----------------------------------------------------------------------------- 6. worklist


def _worklist(rep: _Report, ensembles) -> None:
    import matplotlib.pyplot as plt

    b = rep.section(*SECTIONS[5])
    if not ensembles:
        _p(b, "No ensemble yet: no worklist.", "gap")
        return
    d, ens = ensembles[0]
    name = d.rstrip("/").rsplit("/", 1)[-1]
    wl = ens["worklist"]
    if wl is None:
        _p(b, f"{name}: no worklist.", "gap")
    else:
        _p(b, f"{name}: the first 15 of {len(wl)} test studies, most likely abnormal first", "h3")
        _table(b, wl.head(15))
    st = ens["study_predictions"]
    tri = ens["triage"]
    if st is None or "test" not in set(st["split"]):
        _p(b, "No test studies: no capture curve.", "gap")
        return
    test = st[st["split"] == "test"]
    if "label_name" in test.columns:  # a study is abnormal when any label is
        test = test.groupby("study_id").agg(prob=("prob", "max"), label=("label", "max"))
    order = test.sort_values("prob", ascending=False)
    y = order["label"].fillna(0).to_numpy()
    if y.sum() == 0:
        _p(b, "No abnormal test study: no capture curve.", "gap")
        return
    frac = np.arange(1, len(y) + 1) / len(y)
    captured = np.cumsum(y) / y.sum()
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    ax.plot(np.r_[0, frac], np.r_[0, captured], color="#c00", label="ensemble order")
    ax.plot([0, 1], [0, 1], ":", color="#999", label="random order")
    if tri is not None and len(tri):
        ax.errorbar(tri["fraction"], tri["captured"],
                    yerr=[tri["captured"] - tri["captured_low"],
                          tri["captured_high"] - tri["captured"]],
                    fmt="o", color="k", capsize=3, label="triage.parquet (95% CI)")
    ax.set(xlabel="fraction of the worklist read", ylabel="fraction of abnormal studies found",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=7)
    rep.figure(b, fig, "capture_curve", alt="abnormal studies found against the fraction of the "
               "worklist read", caption="Capture curve: abnormal test studies found in the first "
               "X% of the worklist.")
    if tri is not None and len(tri):
        _table(b, tri[[c for c in ("fraction", "n_top", "found", "captured", "captured_low",
                                   "captured_high", "lift") if c in tri.columns]])
