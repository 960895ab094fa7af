"""Tests for `raysearch status` and `raysearch list` (raysearch.experiment.status): an experiment
seen without running it, on every storage backend. Nothing here starts Ray."""

from __future__ import annotations

import json
import uuid

import pandas as pd
import pytest

from raysearch import experiment as X
from raysearch import storage
from raysearch.cli import main
from tests.gcs_emulator import gcs_emulator  # noqa: F401  (session fixture)


@pytest.fixture(params=["local", "memory", "gcs"])
def store(request, tmp_path):
    name = f"s-{uuid.uuid4().hex[:8]}"
    if request.param == "local":
        yield str(tmp_path / name)
    elif request.param == "memory":
        base = f"memory://raysearch-tests/{name}"
        yield base
        fs, path = storage.get_fs(base)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        yield request.getfixturevalue("gcs_emulator").url(name)


TRIALS = pd.DataFrame({
    "trial_id": ["a", "b", "c", "d"],
    "status": ["completed", "pruned", "pruned", "failed"],
    "epochs": [3, 1, 1, 0],
    "best_val_loss": [0.41, 0.52, 0.38, float("nan")],
    "best_epoch": [3, 1, 1, 0],
    "val_study_kappa": [0.6, 0.3, 0.5, float("nan")],
    "best_checkpoint": ["train-a/checkpoint_000002", "train-b/checkpoint_000000",
                        "train-c/checkpoint_000000", None],
    "wall_time_s": [30.0, 10.0, 10.0, 1.0],
    "error": [None, None, None, "boom"],
    "arch": ["resnet18", "mobilenet_v3_small", "resnet18", "resnet18"],
})
# 5 epochs: train + val seconds sum to 3600 + 1800 = 1.5 h of one trial's time
EPOCHS = pd.DataFrame({
    "trial_id": ["a", "a", "a", "b", "c"],
    "epoch": [1, 2, 3, 1, 1],
    "val_loss": [0.5, 0.45, 0.41, 0.52, 0.38],
    "epoch_time_s": [1000.0, 1000.0, 1000.0, 300.0, 300.0],
    "val_time_s": [600.0, 600.0, 300.0, 150.0, 150.0],
})


def finished_search(store: str, name: str = "exp", *, resources=None) -> str:
    exp = X.experiment_dir(store, name)
    X.update_info(exp, kind="search", name=name, state="finished", trials=4, num_samples=6,
                  resources=resources or {"workers": 2, "gpus_per_worker": 0.0,
                                          "cpus_per_worker": 4.0})
    X.write_results(exp, TRIALS, EPOCHS)
    return exp


def test_a_finished_search_counts_trials_best_epochs_and_cpu_hours(store):
    st = X.experiment_status(finished_search(store))
    assert st.state == "finished" and st.kind == "search" and st.holder is None
    assert st.by_status == {"completed": 1, "pruned": 2, "failed": 1}
    assert (st.trials, st.num_samples, st.epochs) == (4, 6, 5)
    assert st.best["trial_id"] == "c" and st.best["best_val_loss"] == pytest.approx(0.38)
    # 1.5 h of epochs x 2 workers x 4 CPUs each, and no GPU
    assert st.device == "CPU" and st.device_hours == pytest.approx(12.0)


def test_gpu_hours_count_the_gpus_each_trial_held(tmp_path):
    exp = finished_search(str(tmp_path), resources={"workers": 2, "gpus_per_worker": 0.5,
                                                    "cpus_per_worker": 8.0})
    st = X.experiment_status(exp)
    assert st.device == "GPU" and st.device_hours == pytest.approx(1.5)  # 1.5 h x 2 x 0.5


def _checkpoint(exp: str, trial_id: str, epoch: int, val_loss: float) -> None:
    """A trial checkpoint as far as status reads it (every file present and non-empty)."""
    ckpt = storage.join(exp, f"train-{trial_id}", f"checkpoint_{epoch - 1:06d}")
    history = [{"epoch": e, "val_loss": val_loss + (epoch - e) * 0.1, "epoch_time_s": 60.0,
                "val_time_s": 30.0} for e in range(1, epoch + 1)]
    files = {"metrics.json": json.dumps(history[-1] | {"val_study_kappa": 0.4}),
             "history.json": json.dumps(history)}
    for name in X.CHECKPOINT_FILES:
        storage.atomic_write_bytes(storage.join(ckpt, name), files.get(name, "x").encode())


def test_running_only_while_a_run_holds_the_lock_else_interrupted(store):
    exp = X.experiment_dir(store, "live")
    X.update_info(exp, kind="search", name="live", state="running", num_samples=4)
    storage.atomic_write_text(storage.join(exp, "search_space.yaml"),
                              "name: live\nscheduler: {kind: asha, max_epochs: 2}\n")
    _checkpoint(exp, "a", 2, 0.4)
    _checkpoint(exp, "b", 1, 0.6)
    with X.ExperimentLock(exp, command="tune"):
        st = X.experiment_status(exp)
        assert st.state == "running" and st.holder["command"] == "tune"
        # No trials.parquet yet: the trials come from their checkpoints; "a" reached max_epochs.
        assert st.by_status == {"completed": 1, "running": 1} and st.epochs == 3
        assert st.best["trial_id"] == "a" and st.best["best_val_loss"] == pytest.approx(0.4)
    # The run died without writing its end: interrupted, not running.
    st = X.experiment_status(exp)
    assert st.state == "interrupted" and st.holder is None
    assert st.by_status == {"completed": 1, "unfinished": 1}


def test_probing_the_lock_leaves_it_free(tmp_path):
    exp = finished_search(str(tmp_path))
    X.experiment_status(exp)
    with X.ExperimentLock(exp, command="ensemble"):  # would raise if the probe had kept it
        pass


def test_status_command_prints_state_trials_best_and_hours(tmp_path, capsys):
    storage_dir = str(tmp_path / "reports")
    finished_search(storage_dir)
    assert main(["status", "exp", "--storage", storage_dir]) == 0
    out = capsys.readouterr().out
    assert "finished" in out
    assert "4 of 6 (1 completed, 2 pruned, 1 failed)" in out
    assert "c: val_loss 0.3800" in out and "5 epochs, 12.00 CPU-hours" in out
    lines = out.splitlines()  # one `key  value` line each, the values in one column, no padding
    assert lines[0].startswith("experiment  exp (search) ") and lines[1] == "state       finished"
    assert not [line for line in lines if line != line.rstrip()], "trailing spaces"


def test_status_of_a_missing_experiment_is_one_line_exit_2(tmp_path, capsys):
    assert main(["status", "nope", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raysearch: error: no experiment at") and "\n" not in err


def test_list_shows_every_experiment_with_kind_state_trials_best(tmp_path, capsys):
    root = str(tmp_path / "reports")
    finished_search(root, "first")
    X.update_info(X.experiment_dir(root, "single"), kind="train", name="single", state="running")
    frame = X.list_status(root)
    rows = frame.set_index("name")
    assert set(rows.index) == {"first", "single"}
    assert rows.loc["first", "state"] == "finished" and rows.loc["first", "trials"] == 4
    assert rows.loc["first", "best_val_loss"] == pytest.approx(0.38)
    assert (rows.loc["single", "kind"], rows.loc["single", "state"]) == ("train", "interrupted")
    assert main(["list", root]) == 0
    out = capsys.readouterr().out
    assert "first" in out and "single" in out and "0.3800" in out
    (tmp_path / "empty").mkdir()
    assert main(["list", str(tmp_path / "empty")]) == 0
    assert "no experiments under" in capsys.readouterr().out


def test_a_status_is_plain_python_and_json_able(tmp_path):
    """Values read from Parquet arrive as numpy scalars; a status must be JSON-able as it is (a
    notebook or a dashboard serialises it)."""
    st = X.experiment_status(finished_search(str(tmp_path)))
    text = json.dumps(st.to_dict())
    back = json.loads(text)
    assert back["best"]["trial_id"] == "c" and back["best"]["epochs"] == 1
    assert type(st.best["epochs"]) is int and type(st.best["best_val_loss"]) is float


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_list_of_a_local_folder_that_is_not_there_is_one_line_exit_2(tmp_path, capsys, kind):
    where = tmp_path / "runs"
    if kind == "file":
        where.write_text("not a folder")
    assert main(["list", str(where)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(where) in err
    assert ("does not exist" if kind == "missing" else "is not a folder") in err


def test_list_of_an_empty_bucket_prefix_is_empty_not_an_error(capsys):
    assert main(["list", f"memory://raysearch-tests/none-{uuid.uuid4().hex[:8]}"]) == 0
    assert "no experiments" in capsys.readouterr().out


def test_list_shows_the_update_time_status_shows_even_after_a_copy(tmp_path):
    """A copied or downloaded experiment has new file times; `list` must still show when the
    experiment was last updated (what `status` shows), not when its files were copied."""
    import os

    root = str(tmp_path / "reports")
    exp_dir = finished_search(root, "old")
    marker = os.path.join(exp_dir, "experiment.json")
    with open(marker) as f:
        info = json.load(f)
    info["updated"] = "2020-01-02T03:04:05+00:00"
    with open(marker, "w") as f:  # written now, as `cp` without -p leaves its time
        json.dump(info, f)
    st = X.experiment_status(exp_dir)
    assert st.updated == "2020-01-02T03:04:05+00:00"
    assert X.list_status(root).set_index("name").loc["old", "updated"] == "2020-01-02 03:04"


def test_a_few_core_seconds_are_not_shown_as_zero_hours(tmp_path, capsys):
    """A tiny CPU search spends seconds: `status` shows them (two significant digits), not
    `0.00 CPU-hours`, as if nothing had run."""
    exp = X.experiment_dir(str(tmp_path), "tiny")
    X.update_info(exp, kind="search", name="tiny", state="finished", trials=1, num_samples=1,
                  resources={"workers": 1, "gpus_per_worker": 0.0, "cpus_per_worker": 2.0})
    X.write_results(exp, TRIALS.head(1), pd.DataFrame({
        "trial_id": ["a"], "epoch": [1], "val_loss": [0.41], "epoch_time_s": [4.0],
        "val_time_s": [1.4]}))
    assert main(["status", "tiny", "--storage", str(tmp_path)]) == 0
    assert "1 epochs, 0.003 CPU-hours" in capsys.readouterr().out  # 5.4 s x 2 CPUs


def test_list_of_an_experiment_folder_says_it_is_one(tmp_path, capsys):
    """`raysearch list reports/demo` (an experiment, not a storage) says so, with the two
    commands meant, instead of only `no experiments under reports/demo`."""
    exp = finished_search(str(tmp_path / "reports"), "demo")
    assert main(["list", exp]) == 0
    out = capsys.readouterr().out.strip()
    assert out == (f"no experiments under {exp} ({exp} is itself an experiment: `raysearch "
                   f"status {exp}`, or `raysearch list {tmp_path / 'reports'}`)")
