"""The live view's table and bar: fits a 100-column terminal without cutting a cell, epochs as
k/max, one status vocabulary."""

from __future__ import annotations

import io

from rich.console import Console

from raysearch.experiment import TRIAL_STATUSES
from raysearch.report.live import LiveView, end_line
from raysearch.report.tables import best_trials_table, trials_table


def _rows(n: int = 6) -> list[dict]:
    archs = ["efficientnet_b3", "mobilenet_v3_small", "densenet169", "resnet18"]
    return [
        {"trial_id": f"8f3c2a1d_{i:05d}", "status": ["running", "pruned", "early_stopped",
                                                     "completed", "failed", "pending"][i % 6],
         "epoch": i, "max_epochs": 30, "val_loss": 0.61234 + i / 100,
         "best_val_loss": 0.59876 + i / 100, "val_study_kappa": 0.41234 - i / 100,
         "arch": archs[i % 4], "image_size": 384, "lr": 0.000123, "batch_size": 64,
         "dropout": 0.25, "class_weighting": "balanced", "augment": "mura"}
        for i in range(n)
    ]


def _render(table, width: int = 100) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(table)
    return out.getvalue()


def test_the_trials_table_fits_100_columns_without_cutting_a_cell():
    rows = _rows()
    text = _render(trials_table(rows, width=100))
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "…" not in text
    for r in rows:  # ids, architectures and numbers whole
        assert r["trial_id"] in text and r["arch"] in text
        assert f"{r['best_val_loss']:.3f}" in text and f"{r['val_study_kappa']:.3f}" in text
        assert f"{r['epoch']}/30" in text and r["status"] in text


def test_columns_are_dropped_by_priority_and_all_kept_when_wide():
    rows = _rows()
    narrow = _render(trials_table(rows, width=100))
    assert "augment" not in narrow and "aug" not in narrow.split("\n")[1]  # least important
    wide = _render(trials_table(rows, width=200), width=200)
    for header in ("trial", "status", "epoch", "val_loss", "best", "kappa", "arch", "image_size",
                   "lr", "batch_size", "dropout", "class_weighting", "augment"):
        assert header in wide, header
    tiny = _render(trials_table(rows, width=60), width=60)
    assert "…" not in tiny and all(r["trial_id"] in tiny for r in rows)


def test_the_end_table_shows_epochs_of_max_and_the_recorded_status():
    import pandas as pd

    trials = pd.DataFrame([{**r, "epochs": r["epoch"]} for r in _rows()])
    trials = trials.drop(columns=["epoch"])
    text = _render(best_trials_table(trials, width=100))
    assert "3/30" in text and "completed" in text and "…" not in text
    # The recorded best loss shows under `best` only: no last-epoch loss is recorded, so the
    # `val_loss` column does not repeat it under another name.
    best = f"{trials['best_val_loss'].min():.3f}"
    assert text.count(best) == 1, text
    # ... and no val_loss column that shows "-" on every row
    assert "val_loss" not in text.splitlines()[1] and " - " not in text, text


def test_status_words_are_one_vocabulary():
    view = LiveView(num_trials=2, max_epochs=4, console=Console(file=io.StringIO(), width=100))
    view.add("a")
    assert view.rows["a"]["status"] == "pending"
    view.start("a")
    assert view.rows["a"]["status"] == "running"
    view.result("a", {"epoch": 1, "val_loss": 0.5, "best_val_loss": 0.5, "val_study_kappa": 0.2})
    view.end({"trial_id": "a", "status": "pruned", "epochs": 1, "best_val_loss": 0.5,
              "best_epoch": 1, "val_study_kappa": 0.2})
    assert {r["status"] for r in view.rows.values()} <= set(TRIAL_STATUSES)
    assert "done" not in TRIAL_STATUSES and "stopped" not in TRIAL_STATUSES


def test_a_stage_line_is_shown_at_once_and_the_bar_has_an_eta():
    out = io.StringIO()
    view = LiveView(num_trials=3, max_epochs=8, console=Console(file=out, width=100,
                                                                color_system=None))
    view.stage("starting Ray")
    assert "starting Ray ..." in out.getvalue()
    view.result("a", {"epoch": 2, "val_loss": 0.5})
    bar = _render(view.render())
    assert "2/24" in bar and "epochs" in bar and "ETA" in bar


def test_the_end_line_names_the_best_epoch():
    line = end_line({"trial_id": "t1", "status": "early_stopped", "epochs": 7, "max_epochs": 30,
                     "best_val_loss": 0.5, "best_epoch": 3, "val_study_kappa": 0.4,
                     "arch": "resnet18", "image_size": 64})
    assert line == ("trial t1 early_stopped after 7/30 epochs: best val_loss 0.500 at epoch 3, "
                    "val study kappa 0.400 (resnet18, 64 px)")


def test_the_epochs_table_fits_100_columns():
    import pandas as pd

    from raysearch.report.tables import epochs_table

    epochs = pd.DataFrame([{"epoch": e, "train_loss": 0.334, "val_loss": 0.63, "val_auc": 0.636,
                            "val_study_accuracy": 0.571, "val_study_kappa": 0.087, "lr": 1e-3,
                            "epoch_time_s": 20.428, "train_images_per_s": 1234.5}
                           for e in (1, 2, 3)])
    text = _render(epochs_table(epochs))
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 100
    assert "kappa" in text and "1234.500" in text
