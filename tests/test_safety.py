"""Faults a careful user and a hostile one meet (issue "Nothing lost, nothing let in"): a full
disk, a damaged checkpoint, Ctrl-C, a search whose every trial fails, an empty error message,
noisy libraries, a moved experiment, planted pickles. Each kind has a test that holds the right
behaviour; the full-disk ones use a real (tmpfs) full disk where the machine lets a test mount one.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from raysearch import storage
from raysearch.errors import (
    ExperimentStateError,
    SearchFailedError,
    StorageError,
    WeightsError,
)
from tests.faults import inject_faults


def _console() -> Console:
    return Console(file=io.StringIO(), width=120, color_system=None)


@contextlib.contextmanager
def tmpfs(path, size_mb: int):
    """A real file system of ``size_mb`` MB at ``path`` (a full disk is one write away)."""
    os.makedirs(path, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                         check=False, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()[:80]}): the full-disk "
                    "behaviour is covered by the fault-injection tests instead")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: str) -> str:
    """Fill the file system holding ``folder`` to the last byte; returns the filler's path."""
    filler = os.path.join(folder, f"filler-{uuid.uuid4().hex[:6]}")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for block in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * block)
    finally:
        os.close(fd)
    return filler


# ----------------------------------------------------------------------------- full disk


def test_a_write_to_a_full_disk_names_the_file_and_leaves_nothing(tmp_path):
    with tmpfs(tmp_path / "disk", 2) as disk:
        _fill(disk)
        target = os.path.join(disk, "out", "manifest.parquet")
        with pytest.raises(StorageError, match=f"no space left on {target}"):
            storage.atomic_write_parquet(pd.DataFrame({"a": np.arange(100_000)}), target)
        assert not [n for n in os.listdir(os.path.join(disk, "out")) if n != "manifest.parquet"]
        assert not os.path.exists(target)


def test_a_full_disk_is_one_line_and_exit_2_for_every_writing_command(tmp_path, tiny_root,
                                                                        capsys, monkeypatch):
    """`data --out` to a full disk (and, by the same path, any atomic write): no traceback."""
    from raysearch.cli import main

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)  # the last step before the rename
    out = tmp_path / "m.parquet"
    assert main(["data", tiny_root, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"raysearch: error: no space left on {out}"
    assert not out.exists() and not list(tmp_path.glob(".m.parquet.tmp-*"))


def test_an_unexpected_oserror_on_a_full_disk_still_names_the_path(capsys, monkeypatch):
    from raysearch import cli

    def boom(args):
        raise RuntimeError("") from OSError(errno.ENOSPC, "No space left on device", "/x/y")

    monkeypatch.setattr(cli, "cmd_data", boom)
    assert cli.main(["data", "somewhere"]) == 2
    assert capsys.readouterr().err.strip() == "raysearch: error: no space left on /x/y"


def test_the_free_space_check_refuses_what_cannot_fit(tmp_path, tiny_root):
    from raysearch.data.mura import read_mura
    from raysearch.data.prepare import check_free_space
    from raysearch.models import checkpoint_bytes

    manifest = read_mura(tiny_root)
    with tmpfs(tmp_path / "disk", 4) as disk:
        with pytest.raises(StorageError, match="not enough space: the image caches need about"):
            check_free_space(manifest=manifest, image_sizes=[256], cache_dir=f"{disk}/cache",
                             experiment_dir=f"{disk}/exp", checkpoint_bytes=0, num_trials=0)
        with pytest.raises(StorageError, match="checkpoints of 4 trial.s. need about .* MB"):
            check_free_space(manifest=manifest, image_sizes=[16], cache_dir=f"{disk}/cache",
                             experiment_dir=f"{disk}/exp",
                             checkpoint_bytes=checkpoint_bytes("mobilenet_v3_small"), num_trials=4)
        check_free_space(manifest=manifest, image_sizes=[16], cache_dir=f"{disk}/cache",
                         experiment_dir=f"{disk}/exp", checkpoint_bytes=0, num_trials=0)


def test_a_cache_build_on_a_full_disk_is_one_error_not_a_crash(tmp_path, tiny_root):
    """The store is written through a memory map; on a sparse file a full disk would kill the
    decoder with SIGBUS. The space is allocated first, so it is one StorageError."""
    from raysearch.data.cache import build_cache
    from raysearch.data.mura import read_mura

    manifest = read_mura(tiny_root)
    with tmpfs(tmp_path / "disk", 2) as disk:
        with pytest.raises(StorageError, match="no space left on .* for the image cache"):
            build_cache(manifest, image_size=160, cache_dir=disk, progress=False)
        assert os.listdir(disk) == []


FULL_SPACE = """
name: full
data: {{root: {root}, val_fraction: 0.2, seed: 0}}
resources: {{workers_per_trial: 1, max_concurrent: 1, max_failures: 0}}
search: {{algorithm: random, seed: 0, num_samples: 2}}
scheduler: {{kind: fifo, max_epochs: 1, grace_period: 1}}
storage: {storage}
trial: {{weights: none, batch_size: 16, image_size: 32, arch: mobilenet_v3_small, augment: none,
         precise_bn_images: 0}}
space:
  lr: {{loguniform: [0.001, 0.01]}}
"""


def _checkpoints(exp: str) -> list[str]:
    if not os.path.isdir(exp):
        return []
    return [os.path.join(exp, r, c) for r in os.listdir(exp) if r.startswith("train-")
            for c in os.listdir(os.path.join(exp, r)) if c.startswith("checkpoint_")]


@pytest.mark.slow
def test_a_full_disk_mid_search_then_a_resume_loses_nothing(tmp_path, tiny_root):
    """The reported case: the storage filled up mid-search (exit 1 after pages of tracebacks, 0-byte
    checkpoints), then the resume restarted a smaller search. Now: one line and exit 2; after space
    is freed, the same command finishes every trial asked for, none lost."""
    with tmpfs(tmp_path / "disk", 400) as disk:
        space = tmp_path / "full.yaml"
        space.write_text(FULL_SPACE.format(root=tiny_root, storage=disk))
        exp = os.path.join(disk, "full")
        cmd = [sys.executable, "-m", "raysearch.cli", "tune", str(space)]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and not _checkpoints(exp) and proc.poll() is None:
            time.sleep(0.5)
        assert _checkpoints(exp), "no checkpoint was ever written"
        filler = _fill(disk)
        try:
            _, err = proc.communicate(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 2, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("raysearch: error: no space left on") and disk in last, err[-3000:]
        assert "Traceback" not in err

        os.unlink(filler)
        done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        trials = pd.read_parquet(os.path.join(exp, "trials.parquet"))
        assert len(trials) == 2, trials.to_string()
        assert (trials["status"] == "completed").all(), trials[["trial_id", "status", "error"]]
        info = json.loads(Path(exp, "experiment.json").read_text())
        assert info["state"] == "finished"


# ----------------------------------------------------------------------------- damaged checkpoints


def _fake_checkpoint(folder, epoch: int, *, model_bytes: bytes | None = None) -> str:
    import torch

    os.makedirs(folder)
    if model_bytes is None:
        torch.save({"w": torch.full((3,), float(epoch))}, os.path.join(folder, "model.pt"))
    else:
        with open(os.path.join(folder, "model.pt"), "wb") as f:
            f.write(model_bytes)
    torch.save({"epoch": epoch}, os.path.join(folder, "train_state.pt"))
    for name, value in (("trial.json", {}), ("metrics.json", {"epoch": epoch}),
                        ("history.json", [{"epoch": e} for e in range(1, epoch + 1)])):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(value, f)
    pd.DataFrame({"prob": [0.5]}).to_parquet(os.path.join(folder, "val_predictions.parquet"))
    return str(folder)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_and_says_so(tmp_path):
    import ray.train
    import torch

    from raysearch.train.checkpoint import load_resume_state

    _fake_checkpoint(tmp_path / "checkpoint_a", 3)
    good = (tmp_path / "checkpoint_a" / "model.pt").read_bytes()
    for damage in (b"", good[: len(good) // 2]):  # empty, and cut short
        latest = tmp_path / f"checkpoint_b{len(damage)}"
        _fake_checkpoint(latest, 5, model_bytes=damage)
        saved, note = load_resume_state(ray.train.Checkpoint(str(latest)), device="cpu")
        model, state, history, used = saved
        assert used == str(tmp_path / "checkpoint_a")
        assert torch.equal(model["w"], torch.full((3,), 3.0)) and state["epoch"] == 3
        assert len(history) == 3
        assert note.startswith(f"{latest.name} is damaged") and "resuming from checkpoint_a" in note
        shutil.rmtree(latest)
    # Nothing intact left: start over, and say that.
    os.remove(tmp_path / "checkpoint_a" / "history.json")
    _fake_checkpoint(tmp_path / "checkpoint_c", 5, model_bytes=b"")
    saved, note = load_resume_state(ray.train.Checkpoint(str(tmp_path / "checkpoint_c")),
                                    device="cpu")
    assert saved is None and note.endswith("no intact checkpoint left, the trial starts over")


def test_damaged_checkpoints_are_neither_results_nor_members(tmp_path):
    from raysearch.experiment import run_checkpoints

    run = tmp_path / "train-x"
    _fake_checkpoint(run / "checkpoint_1", 1)
    _fake_checkpoint(run / "checkpoint_2", 2, model_bytes=b"")
    assert [m["epoch"] for _, m in run_checkpoints(str(run))] == [1]


# ----------------------------------------------------------------------------- exit codes


@pytest.mark.slow
def test_ctrl_c_exits_130_marks_results_unfinished_and_ensemble_warns(tmp_path, tiny_root):
    from raysearch.ensemble.run import run_ensemble

    space = tmp_path / "s.yaml"
    space.write_text(FULL_SPACE.replace("max_epochs: 1", "max_epochs: 4").format(
        root=tiny_root, storage=tmp_path / "S"))
    exp = str(tmp_path / "S" / "full")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "raysearch.cli", "tune", str(space)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not _checkpoints(exp) and proc.poll() is None:
        time.sleep(0.5)
    assert _checkpoints(exp), "no checkpoint was ever written"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(
        "raysearch: error: interrupted; run the same command to resume")
    info = json.loads(Path(exp, "experiment.json").read_text())
    assert info["state"] == "interrupted"
    trials = pd.read_parquet(os.path.join(exp, "trials.parquet"))
    assert (trials["status"] == "unfinished").any(), trials[["trial_id", "status", "epochs"]]
    assert not (trials["status"] == "completed").all()

    console = _console()
    run_ensemble(experiment=exp, top=1, n_boot=10, console=console)
    assert "warning: experiment full is unfinished (state interrupted" in console.file.getvalue()


@pytest.mark.slow
def test_a_search_whose_every_trial_failed_exits_1_with_the_most_common_error(
    tmp_path, tiny_root, ray_session
):
    import yaml

    from raysearch.search.space import parse_search_space
    from raysearch.search.tune import run_search

    raw = yaml.safe_load(FULL_SPACE.format(root=tiny_root, storage=tmp_path / "S"))
    raw["resources"]["max_concurrent"] = 2  # the session's Ray has 2 CPUs: both at once
    raw["trial"]["seed"] = 4242  # the mark of this test's trials for the injected fault
    with inject_faults({"when": {"seed": 4242}, "epoch": 1}), pytest.raises(SearchFailedError) as e:
        run_search(parse_search_space(raw), console=_console())
    assert e.value.exit_code == 1
    assert str(e.value) == ("all 2 trials failed; the most common error (2 of them): "
                            "RuntimeError: injected failure at epoch 1 (RAYSEARCH_FAULTS_FILE)")
    info = json.loads((tmp_path / "S" / "full" / "experiment.json").read_text())
    assert info["state"] == "failed"


def test_an_error_with_an_empty_message_prints_its_cause(capsys, monkeypatch):
    """Ray's ControllerError has an empty message; the user must see the reason it wraps."""
    from raysearch import cli

    class ControllerError(Exception):
        pass

    def boom(args):
        try:
            raise ValueError("\n  worker group could not start: 0 of 1 GPUs available  \n")
        except ValueError as cause:
            raise ControllerError("") from cause

    monkeypatch.setattr(cli, "cmd_data", boom)
    assert cli.main(["data", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("raysearch: unexpected ControllerError: worker group could not start: "
                          "0 of 1 GPUs available (run with --debug")
    assert err.count("\n") == 0


class _Pickled:  # a class torch's weights_only unpickler refuses, with a coloured message
    pass


def test_error_lines_carry_no_terminal_colour_codes(tmp_path, capsys, monkeypatch):
    """torch's weights_only refusal colours part of its message (ESC [1m ... ESC [0m); neither a
    raysearch error nor the CLI line may carry the escapes."""
    import torch

    from raysearch import cli
    from raysearch.errors import first_line, plain
    from raysearch.models.weights import load_weights_file

    path = tmp_path / "pickled.pth"
    torch.save({"a": _Pickled()}, path)
    with pytest.raises(WeightsError) as info:
        load_weights_file(str(path), arch="resnet18")
    assert "weights_only" in str(info.value) and "\x1b" not in str(info.value)
    assert "do those steps only if you trust" in str(info.value)  # the words stay, the codes go

    coloured = "\x1b[1m\x1b[31mbad\x1b[0m value \x1b]8;;https://x\x1b\\link\x1b]8;;\x1b\\ here\r"
    assert plain(coloured) == "bad value link here"
    assert first_line(RuntimeError("\x1b[0m\n" + coloured)) == "bad value link here"
    for raised, code in ((WeightsError(coloured), 2), (RuntimeError(coloured), 1)):
        def boom(args, raised=raised):
            raise raised

        monkeypatch.setattr(cli, "cmd_data", boom)
        assert cli.main(["data", "x"]) == code
        err = capsys.readouterr().err
        assert "bad value link here" in err and "\x1b" not in err and "\r" not in err


# ----------------------------------------------------------------------------- quiet by default


def test_an_unreachable_bucket_fails_fast_with_one_line(monkeypatch):
    """Offline, gcsfs logged a 40-line traceback and retried for 70 s; now the endpoint's host is
    resolved first and the weights URL gets one clear error."""
    from raysearch.models.factory import create_model

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://raysearch-offline.invalid:4443")
    monkeypatch.setattr(storage, "_REACHABLE", {})
    with pytest.raises(WeightsError, match="cannot reach gs://b/w.pth: raysearch-offline.invalid "
                       "does not resolve"):
        create_model("resnet18", weights="gs://b/w.pth")


def test_library_logs_go_to_the_log_file_not_the_terminal(tmp_path, monkeypatch, capsys):
    from raysearch import logs

    monkeypatch.setenv("RAYSEARCH_LOG_DIR", str(tmp_path))
    monkeypatch.setattr(logs, "_state", {"path": None})
    monkeypatch.setattr(logs, "_handlers", [])
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate)
             for n in logs.LIBRARY_LOGGERS}
    try:
        path = logs.quiet_libraries(command="tune")
        logging.getLogger("ray.tune.execution.tune_controller").error(
            "Trial train_abc errored after 2 iterations\nTraceback (most recent call last): ...")
        logging.getLogger("gcsfs").warning("retrying after 503")
        for h in logs._handlers:
            h.flush()
        assert capsys.readouterr().err == ""
        text = Path(path).read_text()
        assert "Trial train_abc errored" in text and "retrying after 503" in text
        assert logs.quiet_libraries(verbose=True) is None
    finally:
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate


# ----------------------------------------------------------------------------- moved experiments


@pytest.mark.slow
def test_a_moved_experiment_can_be_ensembled(small_experiment, tmp_path):
    from raysearch.ensemble.run import run_ensemble

    moved = tmp_path / "elsewhere" / "small"
    shutil.copytree(small_experiment, moved)
    trials = pd.read_parquet(moved / "trials.parquet")
    assert trials["best_checkpoint"].dropna().str.startswith("train-").all()
    out = run_ensemble(experiment=str(moved), top=2, n_boot=10, console=_console())
    members = pd.read_parquet(os.path.join(out, "members.parquet"))
    assert members["best_checkpoint"].str.startswith(str(moved)).all()

    # An experiment written before paths were relative: absolute paths into a folder that is gone.
    trials["best_checkpoint"] = [
        None if c is None else f"/gone/away/small/{c}" for c in trials["best_checkpoint"]
    ]
    trials.to_parquet(moved / "trials.parquet")
    out = run_ensemble(experiment=str(moved), top=2, n_boot=10, out=str(tmp_path / "e2"),
                       console=_console())
    members = pd.read_parquet(os.path.join(out, "members.parquet"))
    assert members["best_checkpoint"].str.startswith(str(moved)).all()


# ----------------------------------------------------------------------------- trusted state


@pytest.mark.slow
def test_a_planted_pickle_stops_the_resume_before_ray_reads_it(small_experiment, small_space,
                                                                tmp_path):
    """Restoring hands Ray's pickles to Ray: a file planted in the storage would run code. The
    resume checks every such file against the hashes it signed, and refuses."""
    import pickle

    from raysearch.search.space import load_search_space
    from raysearch.search.tune import run_search

    store = tmp_path / "S"
    shutil.copytree(small_experiment, store / "small")
    spec = load_search_space(small_space, storage=str(store))
    assert run_search(spec, console=_console()) == str(store / "small")  # signed: resumes

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    planted = next((store / "small").glob("searcher-state-*.pkl"))
    planted.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ExperimentStateError, match="refusing to resume .*searcher-state"):
        run_search(spec, console=_console())
    assert not marker.exists()
