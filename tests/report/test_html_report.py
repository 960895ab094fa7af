"""`raysearch report` on a small real experiment (a 6-trial Ray search, then its ensemble): one
self-contained HTML file that makes no network request, opened in a real headless Chromium."""

from __future__ import annotations

import html
import io
import os
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from raysearch.report.html import CSP, SECTIONS, build_report
from raysearch.storage import join

CHROMIUM = "/usr/bin/chromium-headless-shell"


@pytest.fixture(scope="module")
def report(small_experiment, tmp_path_factory):
    from raysearch.ensemble.run import run_ensemble

    run_ensemble(experiment=small_experiment, top=3, n_boot=200, seed=0,
                 out=join(small_experiment, "ensemble_report"),
                 console=Console(file=io.StringIO(), width=120))
    out = str(tmp_path_factory.mktemp("html") / "report.html")
    start = time.perf_counter()
    path, stats = build_report(small_experiment, out=out)
    stats["wall_s"] = time.perf_counter() - start
    return {"path": path, "stats": stats, "exp": small_experiment}


@pytest.mark.slow
def test_one_offline_file_with_every_section(report):
    path = report["path"]
    page = Path(path).read_text(encoding="utf-8")
    files = os.listdir(os.path.dirname(path))
    assert sorted(files) == ["report.html", "report_figures"]  # atomic: no temporary file left
    assert os.path.getsize(path) < 5_000_000
    csp = re.findall(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page)
    assert [html.unescape(c) for c in csp] == [CSP]
    assert "<script" not in page
    # nothing loads from outside: every src is a data: URI, every href an in-page anchor
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/svg+xml;base64,") for s in srcs)
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', page))
    for sid, title in SECTIONS:
        assert f'<section id="{sid}">' in page and f"<h2>{title}</h2>" in page
    # every figure has alt text and a standalone SVG next to the page
    alts = re.findall(r'<img src="[^"]*" alt="([^"]+)"', page)
    assert len(alts) == len(srcs) == report["stats"]["figures"]
    svgs = os.listdir(report["stats"]["figure_dir"])
    assert len(svgs) == len(srcs) and all(s.endswith(".svg") for s in svgs)
    # how the ensemble's selection score grew with each member added (issue 19, section 3)
    assert any(s.endswith("_selection_path.svg") for s in svgs), svgs
    # real numbers from the experiment: every trial id, and the ensemble's members
    trials = pd.read_parquet(join(report["exp"], "trials.parquet"))
    assert all(t in page for t in trials["trial_id"])
    for needle in ("ROC", "Cohen&#39;s kappa", "expected calibration error", "Capture curve", "random forest",
                   "MURA paper ensemble", "explanations.parquet and audit.parquet are absent"):
        assert needle in page, needle


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium(report, tmp_path):
    from playwright.sync_api import sync_playwright

    errors, outside, failed = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: failed.append(r.url))
        page.on("request", lambda r: outside.append(r.url)
                if not r.url.startswith(("data:", "file:")) else None)
        page.goto("file://" + report["path"])
        page.wait_for_load_state("load")
        sizes = page.eval_on_selector_all(
            "img", "els => els.map(e => [e.complete, e.naturalWidth, e.clientHeight])")
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert errors == [] and outside == [] and failed == []
    assert sizes and all(ok and w > 0 and h > 0 for ok, w, h in sizes), sizes
    # not blank: a full page of many distinct colours
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.height > 3000
    assert len(img.getcolors(maxcolors=1 << 20) or []) > 50


@pytest.mark.slow
def test_a_single_trial_without_ensemble_labels_the_gaps(small_experiment, tmp_path):
    exp = tmp_path / "one"
    exp.mkdir()
    for name in ("experiment.json", "manifest.parquet", "search_space.yaml", "epochs.parquet"):
        shutil.copy(os.path.join(small_experiment, name), exp / name)
    trials = pd.read_parquet(os.path.join(small_experiment, "trials.parquet"))
    trials.head(1).to_parquet(exp / "trials.parquet")
    path, _ = build_report(str(exp))
    page = Path(path).read_text(encoding="utf-8")
    assert path == str(exp / "report.html")
    for needle in ("No ensemble yet", "nothing to evaluate", "no worklist"):
        assert needle in page
    for sid, title in SECTIONS:
        assert f"<h2>{title}</h2>" in page


@pytest.mark.slow
def test_explanations_show_their_table_and_overlays_when_present(small_experiment, tmp_path):
    from PIL import Image

    exp = tmp_path / "explained"
    exp.mkdir()
    for name in ("experiment.json", "trials.parquet", "epochs.parquet", "search_space.yaml"):
        shutil.copy(os.path.join(small_experiment, name), exp / name)
    (exp / "explain" / "overlays").mkdir(parents=True)
    Image.new("RGB", (24, 24), (200, 30, 30)).save(exp / "explain" / "overlays" / "a.png")
    pd.DataFrame({"study_id": ["s1", "s2"], "method": ["gradcam", "gradcam"],
                  "overlay": ["overlays/a.png", "overlays/missing.png"],
                  "prob": [0.9, 0.2]}).to_parquet(exp / "explain" / "explanations.parquet")
    path, _ = build_report(str(exp))
    page = Path(path).read_text(encoding="utf-8")
    assert "explain/explanations.parquet (2 rows)" in page
    assert page.count('src="data:image/png;base64,') == 1  # the missing overlay is skipped
    assert "are absent" not in page


@pytest.mark.slow
def test_the_command_writes_the_page_and_says_where(report, tmp_path, capsys):
    from raysearch.cli import main

    out = tmp_path / "cli" / "r.html"
    assert main(["report", "--experiment", report["exp"], "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"-> {out}" in said and "figures" in said
    assert out.stat().st_size > 10_000 and (tmp_path / "cli" / "r_figures").is_dir()
    assert main(["report", "--experiment", "nope", "--storage", str(tmp_path)]) == 2
    assert "no experiment at" in capsys.readouterr().err


def test_the_member_to_beat_is_chosen_on_the_selection_set_never_on_test():
    import pandas as pd

    from raysearch.report.html import _best_member

    rows = [("a", "val", 0.6), ("b", "val", 0.4), ("a", "test", 0.3), ("b", "test", 0.7),
            ("ensemble", "val", 0.65), ("ensemble", "test", 0.5)]
    cm = pd.DataFrame([{"model": m, "split": s, "kappa": k, "body_part": "ALL"}
                       for m, s, k in rows])
    assert _best_member(cm, "body_part") == "a"
    oof = cm.assign(split=cm["split"].replace({"val": "oof"}))
    oof.loc[(oof["model"] == "b") & (oof["split"] == "oof"), "kappa"] = 0.9
    assert _best_member(oof, "body_part") == "b"
