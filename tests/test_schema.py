"""Tests for the output schemas (raysearch.experiment.schema): every file the pipeline writes
has the columns and Arrow types the one schema module lists, whatever the run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raysearch.config import TrialConfig
from raysearch.data.augment import DeviceAugment
from raysearch.data.mura import MURA_TASK
from raysearch.experiment import results_tables, trial_summary, write_results
from raysearch.experiment import schema as S
from raysearch.train.checkpoint import write_checkpoint
from raysearch.train.loop import make_lr_schedule, make_optimizer

FILES_AT = {f.file: f for f in S.FILES}


def assert_matches_schema(folder: str | os.PathLike, *, group: str = "body_part") -> list[str]:
    """Every schema file found in ``folder`` (an experiment or ensemble folder) has each listed
    fixed column, and every column it has is listed with the very Arrow type it was written
    with. Returns the files checked."""
    folder = Path(folder)
    checked = []
    for f in S.FILES:
        name = f.file.removeprefix("ensemble/")
        path = next((p for p in (folder / f.file, folder / name) if p.exists()), None)
        if path is None:
            continue
        written = pq.read_schema(path)
        for field in written:
            col = f.column(field.name, group=group)
            assert col is not None, f"{f.file}: column {field.name} is not in the schema"
            assert field.type == col.type, f"{f.file}: {field.name} is {field.type}, not {col.type}"
            assert not pa.types.is_null(field.type), f"{f.file}: {field.name} has type null"
        fixed = {c.name for c in f.all_columns() if "<" not in c.name and c.name != "label_name"}
        assert fixed <= set(written.names), f"{f.file} lacks {sorted(fixed - set(written.names))}"
        checked.append(f.file)
    summary = next((p for p in (folder / "ensemble" / "ensemble.json", folder / "ensemble.json")
                    if p.exists()), None)
    if summary is not None:
        assert_ensemble_json_matches(json.loads(summary.read_text()))
        checked.append("ensemble/ensemble.json")
    return checked


# A JSON type name of schema.ENSEMBLE_JSON -> the Python types json.load gives for it.
_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
               "object": (dict,), "array": (list,), "null": (type(None),)}


def assert_ensemble_json_matches(summary: dict) -> None:
    """``ensemble.json`` has every key that ``schema.ENSEMBLE_JSON`` documents and no other,
    each value of a documented JSON type (``"integer or null"``: either)."""
    assert set(summary) == set(S.ENSEMBLE_JSON), (
        f"ensemble.json keys differ from the schema: undocumented "
        f"{sorted(set(summary) - set(S.ENSEMBLE_JSON))}, missing "
        f"{sorted(set(S.ENSEMBLE_JSON) - set(summary))}")
    for key, value in summary.items():
        names = S.ENSEMBLE_JSON[key][0].split(" or ")
        allowed = tuple(t for n in names for t in _JSON_TYPES[n])
        is_bool = isinstance(value, bool)  # JSON's true is no integer or number
        assert isinstance(value, allowed) and (not is_bool or bool in allowed), (
            f"ensemble.json: {key} is {value!r}, not {S.ENSEMBLE_JSON[key][0]}")


def _fake_run(exp: Path, trial_id: str, *, epochs: int, cfg: TrialConfig) -> None:
    """A Train run folder as a trial leaves it: one checkpoint per epoch, written by the real
    write_checkpoint (history.json carries every epoch's report, as the worker builds it)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 1))
    optimizer = make_optimizer(cfg, model.parameters())
    scheduler = make_lr_schedule(cfg, optimizer, steps_per_epoch=2)
    augment = DeviceAugment(cfg.augment_params(), device="cpu", seed=0)
    val = pd.DataFrame({"image_path": ["a.png", "b.png"], "study_id": ["s1", "s2"],
                        "patient_id": ["p1", "p2"], "body_part": ["WRIST", "HAND"],
                        "label": [0, 1]})  # fmt: skip
    history = []
    for epoch in range(1, epochs + 1):
        history.append({
            "epoch": epoch, "train_loss": 0.7, "val_loss": 0.7 - 0.1 * epoch, "val_auc": 0.6,
            "val_study_accuracy": 0.5, "val_study_kappa": 0.1 * epoch, "val_kappa_WRIST": 0.2,
            "val_auc_WRIST": 0.6, "best_val_loss": 0.7 - 0.1 * epoch, "lr": 1e-3,
            "epoch_time_s": 1.0, "val_time_s": 0.5, "train_images_per_s": 10.0,
            "early_stopped": False, "reported_at": 1796102459.222519636 + epoch, "node_id": "n1",
        })
        d = exp / f"train-{trial_id}" / f"checkpoint_{epoch - 1:06d}"
        d.mkdir(parents=True)
        write_checkpoint(str(d), model, optimizer, scheduler, augment, cfg, MURA_TASK, val,
                         np.array([0.3, 0.6]), epoch=epoch, best_val_loss=0.5, bad_epochs=0,
                         history=history)  # fmt: skip


@pytest.mark.parametrize("with_failure", [False, True])
def test_trials_and_epochs_have_fixed_types_whether_or_not_a_trial_failed(tmp_path, with_failure):
    """A column that is empty in one run (error, a None-able config key, best_checkpoint) is no
    Arrow `null` there and a string or double in the next: the types are the schema's, always."""
    cfg = TrialConfig(arch="resnet18", weights="none", max_epochs=2)
    _fake_run(tmp_path, "t1", epochs=2, cfg=cfg)
    rows, frames = [], []
    for tid, error in [("t1", None)] + ([("t2", "RuntimeError: boom")] if with_failure else []):
        row, frame = trial_summary(str(tmp_path), tid, config=cfg.to_dict(), max_epochs=2,
                                   error=error)  # fmt: skip
        rows.append(row)
        frames.append(frame)
    write_results(str(tmp_path), *results_tables(rows, frames))
    assert assert_matches_schema(tmp_path) == ["trials.parquet", "epochs.parquet"]
    trials = pq.read_schema(tmp_path / "trials.parquet")
    assert trials.field("error").type == pa.string() and trials.field("rotation").type == pa.float64()
    epochs = pd.read_parquet(tmp_path / "epochs.parquet")
    assert str(epochs["reported_at"].dtype) == "datetime64[us, UTC]"
    # time.time() seconds, to the microsecond
    assert epochs["reported_at"].iloc[-1] == pd.Timestamp("2026-12-01 05:21:01.222519", tz="UTC")
    # the last epoch's checkpoint carries its own write time (it was empty on every last epoch)
    assert epochs["checkpoint_write_s"].notna().all() and (epochs["checkpoint_write_s"] > 0).all()
    last = json.loads((tmp_path / "train-t1" / "checkpoint_000001" / "metrics.json").read_text())
    assert last["checkpoint_write_s"] > 0
    assert not {"fail_at_epoch", "fail_mode"} & set(trials.names)


def test_the_tables_rows_do_not_depend_on_the_order_tune_lists_its_trials():
    """A restored search lists its trials in another order; the files it writes are the same:
    trials by best val_loss (ties by id), epochs in reporting order."""
    def frame(tid, times):
        return pd.DataFrame({"trial_id": tid, "epoch": range(1, len(times) + 1),
                             "reported_at": pd.to_datetime(times, unit="s", utc=True)})

    from raysearch.experiment.trials import TRIAL_COLUMNS

    rows = [{**dict.fromkeys(TRIAL_COLUMNS), "trial_id": t, "best_val_loss": v}
            for t, v in (("b", 0.5), ("a", 0.5), ("c", 0.4))]
    frames = [frame("b", [10.0, 30.0]), frame("a", [20.0, 25.0]), frame("c", [5.0])]
    t1, e1 = results_tables(rows, frames)
    t2, e2 = results_tables(rows[::-1], frames[::-1])
    pd.testing.assert_frame_equal(t1, t2)
    pd.testing.assert_frame_equal(e1, e2)
    assert list(t1["trial_id"]) == ["c", "a", "b"]
    assert list(zip(e1["trial_id"], e1["epoch"])) == [("c", 1), ("b", 1), ("a", 1), ("a", 2),
                                                      ("b", 2)]


def test_a_search_without_epochs_still_writes_every_column_typed(tmp_path):
    write_results(str(tmp_path), *results_tables([], []))
    assert assert_matches_schema(tmp_path) == ["trials.parquet", "epochs.parquet"]


def test_a_column_missing_from_the_schema_is_refused(tmp_path):
    df = pd.DataFrame({"trial_id": ["a"], "colour": ["red"]})
    with pytest.raises(ValueError, match="column 'colour' is not in raysearch.experiment.schema"):
        S.write_parquet(df, str(tmp_path / "t.parquet"), S.TRIALS)


def test_members_of_an_earlier_release_read_with_this_column_name():
    old = pd.DataFrame({"trial_id": ["a"], "checkpoint": ["/x/train-a/checkpoint_000001"]})
    assert list(S.normalize_members(old).columns) == ["trial_id", "best_checkpoint"]


def test_the_schema_doc_is_rendered_from_the_module():
    doc = Path(__file__).parents[1] / "docs" / "SCHEMAS.md"
    assert doc.read_text() == S.render_markdown(), (
        "docs/SCHEMAS.md is stale: python -m raysearch.experiment.schema > docs/SCHEMAS.md")
    for key in S.ENSEMBLE_JSON:
        assert f"`{key}`" in doc.read_text()


def test_the_ensemble_json_check_holds_values_to_their_documented_types():
    """The check the ensemble tests run on each ensemble.json they write (through
    :func:`assert_matches_schema`): keys and JSON types, a null only where one is documented."""
    good = {"experiment": "/x", "method": "top", "top": 2, "tta": False, "n_boot": 20, "seed": 0,
            "device": "cpu", "weights": {"a": 1.0}, "task": {}, "n_test_studies": 17,
            "threshold": 0.5, "threshold_rule": "r", "selection": "val", "folds": None,
            "selection_path": [], "target_sensitivity": 0.9, "worklist_rule": "max",
            "test_data": None, "test_format": None}
    assert_ensemble_json_matches(good)
    assert_ensemble_json_matches({**good, "folds": 3, "threshold": {"Edema": 0.4}})
    for bad in ({"top": 2.5}, {"tta": 1}, {"n_boot": True}, {"method": None}, {"colour": 1}):
        with pytest.raises(AssertionError):
            assert_ensemble_json_matches({**good, **bad})
    for key, (kind, _) in S.ENSEMBLE_JSON.items():
        assert set(kind.split(" or ")) <= set(_JSON_TYPES), (key, kind)
