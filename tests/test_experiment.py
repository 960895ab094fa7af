"""Tests for the experiment folder: safe names, guarded deletion, one writer, trusted Ray state,
relative paths and damaged state. Deletion, locking and trust run against a local folder,
memory:// and the GCS emulator."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from raysearch import experiment as X
from raysearch import storage
from raysearch.errors import ConfigError, ExperimentLockedError, ExperimentStateError
from tests.gcs_emulator import gcs_emulator  # noqa: F401  (session fixture)

BACKENDS = ["local", "memory", "gcs"]


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    """A fresh, empty storage root on one backend."""
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


def _files(base: str) -> list[str]:
    fs, path = storage.get_fs(base)
    if not fs.exists(path):
        return []
    return sorted(p[len(path.rstrip("/")) + 1 :] for p in fs.find(path, withdirs=False))


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "../other", "a/b", "a\\b", "/abs", "x\x00y", "line\nbreak", "tab\tname",
     "*", "a?b", "x#1", "[ab]", ".hidden", "-rf", "cache", "a" * 129, 7, None],
)
def test_unsafe_names_are_refused(name):
    with pytest.raises(ConfigError, match="name"):
        X.check_name(name)


@pytest.mark.parametrize("name", ["demo", "mura", "bench-s0-fifo", "run_2026.12.01", "a+b=c@d,e"])
def test_safe_names_pass(name):
    assert X.check_name(name) == name


def test_every_source_of_a_name_is_checked(tmp_path):
    """YAML `name:`, the --name override, and the train file's `name:` all go through one check."""
    from raysearch.config import load_trial_config
    from raysearch.search.space import load_search_space

    space = tmp_path / "s.yaml"
    space.write_text("name: ..\nspace: {lr: {choice: [0.001]}}\n")
    with pytest.raises(ConfigError, match="name"):
        load_search_space(str(space))
    space.write_text("name: ok\nspace: {lr: {choice: [0.001]}}\n")
    with pytest.raises(ConfigError, match="name"):
        load_search_space(str(space), name=".")
    trial = tmp_path / "t.yaml"
    trial.write_text("name: ../other\narch: resnet18\n")
    with pytest.raises(ConfigError, match="name"):
        load_trial_config(str(trial))


# ----------------------------------------------------------------------------- deletion


def _make_experiment(store: str, name: str) -> str:
    exp = storage.join(store, name)
    X.update_info(exp, kind="search", name=name)
    storage.atomic_write_text(storage.join(exp, "train-1", "checkpoint_1", "model.pt"), "w")
    return exp


def test_remove_experiment_deletes_only_a_marked_direct_child(store):
    exp = _make_experiment(store, "old")
    keep = storage.join(store, "data", "image.png")
    storage.atomic_write_text(keep, "precious")

    X.remove_experiment(exp, storage=store)

    assert _files(store) == ["data/image.png"]
    # Not an experiment (no marker): refused, nothing deleted.
    with pytest.raises(ExperimentStateError, match="not a raysearch experiment"):
        X.remove_experiment(storage.join(store, "data"), storage=store)
    # Not a direct child of the storage root: refused whatever it holds.
    nested = _make_experiment(storage.join(store, "data"), "inner")
    with pytest.raises(ExperimentStateError, match="not a folder directly inside"):
        X.remove_experiment(nested, storage=store)
    with pytest.raises(ExperimentStateError, match="not a folder directly inside"):
        X.remove_experiment(store, storage=store)
    assert "data/image.png" in _files(store)


def test_dry_run_checks_without_deleting(store):
    exp = _make_experiment(store, "old")
    X.remove_experiment(exp, storage=store, dry_run=True)
    assert "old/experiment.json" in _files(store)


@pytest.mark.parametrize("flags", [["--name", "..", "--overwrite"], ["--name", ".", "--overwrite"],
                                   ["--name", "../victim", "--overwrite"]])
def test_tune_overwrite_with_an_escaping_name_deletes_nothing(tmp_path, capsys, flags):
    """The reported case: `tune --storage S --name .. --overwrite` deleted S's parent, before it had
    even found out that the data root did not exist."""
    from raysearch.cli import main

    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("x")
    st = tmp_path / "S"
    st.mkdir()
    (st / "cache").mkdir()
    space = tmp_path / "s.yaml"
    space.write_text(f"data: {{root: {tmp_path / 'no-such-data'}}}\nstorage: {st}\n"
                     "trial: {weights: none}\nspace: {lr: {choice: [0.001]}}\n")
    assert main(["tune", str(space), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "name" in err
    assert (tmp_path / "victim" / "keep.txt").exists() and (st / "cache").is_dir()


def test_train_fresh_with_an_escaping_name_deletes_nothing(tmp_path, capsys):
    from raysearch.cli import main

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    cfg = tmp_path / "t.yaml"
    cfg.write_text("arch: resnet18\nweights: none\n")
    code = main(["train", str(cfg), "--storage", str(tmp_path / "S"), "--name", "../other",
                 "--fresh"])
    assert code == 2 and "name" in capsys.readouterr().err
    assert (tmp_path / "other" / "keep.txt").exists()


def test_overwrite_deletes_only_after_every_other_check(tmp_path, capsys):
    """A valid --overwrite whose data root is missing fails on the data and keeps the experiment."""
    from raysearch.cli import main

    st = tmp_path / "S"
    exp = _make_experiment(str(st), "demo")
    space = tmp_path / "s.yaml"
    space.write_text(f"name: demo\ndata: {{root: {tmp_path / 'no-such-data'}}}\nstorage: {st}\n"
                     "trial: {weights: none}\nspace: {lr: {choice: [0.001]}}\n")
    assert main(["tune", str(space), "--overwrite"]) == 2
    assert "dataset folder does not exist" in capsys.readouterr().err
    assert os.path.exists(os.path.join(exp, "train-1", "checkpoint_1", "model.pt"))
    # A folder that is not an experiment is neither overwritten nor written into (the data
    # root is checked first, before Ray: give it one that passes that check).
    (st / "mine").mkdir()
    (st / "mine" / "notes.txt").write_text("x")
    space.write_text(space.read_text().replace("name: demo", "name: mine")
                     .replace(str(tmp_path / "no-such-data"), _csvs_only(tmp_path / "data")))
    assert main(["tune", str(space), "--overwrite"]) == 2
    assert "not a raysearch experiment" in capsys.readouterr().err
    assert main(["tune", str(space)]) == 2
    assert "not a raysearch experiment" in capsys.readouterr().err
    assert (st / "mine" / "notes.txt").exists()


# ----------------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_and_named(store):
    exp = storage.join(store, "exp")
    with X.ExperimentLock(exp, command="tune"):
        with pytest.raises(ExperimentLockedError) as e:
            X.ExperimentLock(exp, command="ensemble").acquire()
        message = str(e.value)
        assert "`raysearch tune`" in message and f"pid {os.getpid()}" in message
        assert "host " in message and "since " in message
    # Released: the next run gets it, and no lock file is left behind.
    with X.ExperimentLock(exp, command="ensemble"):
        pass
    assert X.LOCK_NAME not in " ".join(_files(store))


def test_a_dead_holders_lease_expires(store, monkeypatch):
    """A holder that died without releasing: its lock stops counting once its lease is over."""
    exp = storage.join(store, "exp")
    if storage.is_url(store):
        stale = {"host": "gone", "pid": 1, "command": "tune", "started": "then",
                 "expires": time.time() - 1, "token": "dead"}
        storage.atomic_write_text(storage.join(exp, X.LOCK_NAME), json.dumps(stale))
        with X.ExperimentLock(exp, command="tune"):
            pass
    else:  # local locks are flocks: the kernel drops them when the process dies
        code = textwrap.dedent(f"""
            import os, signal
            from raysearch.experiment import ExperimentLock
            ExperimentLock({exp!r}, command="tune").acquire()
            print("held", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """)
        out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                             text=True, timeout=60)
        assert "held" in out.stdout
        with X.ExperimentLock(exp, command="tune"):
            pass


def test_a_live_lock_in_another_process_refuses(tmp_path):
    exp = str(tmp_path / "exp")
    code = textwrap.dedent(f"""
        import sys, time
        from raysearch.experiment import ExperimentLock
        with ExperimentLock({exp!r}, command="tune"):
            print("held", flush=True)
            sys.stdin.readline()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ExperimentLockedError, match=f"pid {holder.pid}"):
            X.ExperimentLock(exp, command="tune").acquire()
    finally:
        holder.communicate("\n", timeout=30)


def _csvs_only(folder) -> str:
    """A data root with MURA's CSVs and nothing else: it passes the checks made before Ray."""
    from raysearch.data.roots import MURA_CSVS

    folder.mkdir(parents=True, exist_ok=True)
    for name in MURA_CSVS:
        (folder / name).write_text("")
    return str(folder)


def test_tune_refuses_while_another_run_holds_the_experiment(tmp_path, capsys):
    from raysearch.cli import main

    st = tmp_path / "S"
    space = tmp_path / "s.yaml"
    space.write_text(f"name: busy\ndata: {{root: {_csvs_only(tmp_path / 'data')}}}\nstorage: {st}\n"
                     "trial: {weights: none}\nspace: {lr: {choice: [0.001]}}\n")
    with X.ExperimentLock(str(st / "busy"), command="tune"):
        assert main(["tune", str(space)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in use by `raysearch tune`" in err and str(os.getpid()) in err


# ----------------------------------------------------------------------------- trust


def _ray_like_state(exp: str) -> None:
    storage.atomic_write_bytes(storage.join(exp, "tuner.pkl"), pickle.dumps({"tuner": 1}))
    storage.atomic_write_text(storage.join(exp, "experiment_state-2026.json"),
                              json.dumps({"trial_data": []}))
    storage.atomic_write_bytes(storage.join(exp, "searcher-state-2026.pkl"), pickle.dumps([1, 2]))
    storage.atomic_write_bytes(storage.join(exp, "trial_a", "error.pkl"), pickle.dumps("boom"))


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_signed_state_verifies_and_a_planted_pickle_is_refused(store):
    exp = storage.join(store, "exp")
    _ray_like_state(exp)
    assert X.sign_ray_state(exp) == 4
    X.verify_ray_state(exp)

    for planted in ("searcher-state-2026.pkl", "callback-states-2027.pkl", "trial_b/error.pkl"):
        path = storage.join(exp, planted)
        before = storage.read_bytes(path) if storage.exists(path) else None
        storage.atomic_write_bytes(path, pickle.dumps(_Payload()))
        with pytest.raises(ExperimentStateError, match=f"refusing to resume .*{planted}"):
            X.verify_ray_state(exp)
        if before is None:
            storage.get_fs(path)[0].rm(storage.get_fs(path)[1])
        else:
            storage.atomic_write_bytes(path, before)
    X.verify_ray_state(exp)


def test_a_forged_trust_file_is_refused(store, monkeypatch):
    """Whoever can write the storage can rewrite the trust file too: without the key, the
    signature does not match and nothing verifies."""
    exp = storage.join(store, "exp")
    _ray_like_state(exp)
    monkeypatch.setenv("RAYSEARCH_TRUST_KEY", "the attacker's key")
    X.sign_ray_state(exp)
    monkeypatch.setenv("RAYSEARCH_TRUST_KEY", "this machine's key")
    with pytest.raises(ExperimentStateError, match="no raysearch-trust.json signed with this"):
        X.verify_ray_state(exp)


def test_the_trust_key_is_made_once_private_and_outside_the_storage(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYSEARCH_TRUST_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))
    from raysearch.experiment.trust import _trust_key

    key = _trust_key()
    path = tmp_path / ".config" / "raysearch" / "trust.key"
    assert len(key) == 32 and path.read_bytes() == key
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert _trust_key() == key


def test_damaged_state_is_found_without_unpickling(tmp_path):
    exp = str(tmp_path / "exp")
    _ray_like_state(exp)
    X.check_ray_state_intact(exp)
    good = pickle.dumps({"a": list(range(100))})
    (tmp_path / "exp" / "searcher-state-2026.pkl").write_bytes(good[: len(good) // 2])
    with pytest.raises(ExperimentStateError, match="damaged: searcher-state-2026.pkl"):
        X.check_ray_state_intact(exp)
    (tmp_path / "exp" / "searcher-state-2026.pkl").write_bytes(good)
    (tmp_path / "exp" / "experiment_state-2027.json").write_text('{"trial_data": [')
    with pytest.raises(ExperimentStateError, match="experiment_state-2027.json .incomplete JSON.* "
                       "delete experiment_state-2027.json to resume from .*2026"):
        X.check_ray_state_intact(exp)
    (tmp_path / "exp" / "experiment_state-2027.json").write_bytes(b"")
    with pytest.raises(ExperimentStateError, match="empty"):
        X.check_ray_state_intact(exp)


def test_ray_failing_to_restore_raises_instead_of_starting_over():
    import logging

    logger = logging.getLogger("ray.tune.execution.tune_controller")
    with X.fail_on_restore_error(), pytest.raises(ExperimentStateError, match="will not start"):
        try:
            raise pickle.UnpicklingError("pickle data was truncated")
        except pickle.UnpicklingError:
            logger.exception("Failed to restore the run state.")
    logger.error("Failed to restore the run state.")  # outside the block: only logged


# ----------------------------------------------------------------------------- paths


def test_paths_inside_an_experiment_are_stored_relative_and_resolve_after_a_move(tmp_path):
    old = str(tmp_path / "old" / "exp")
    new = str(tmp_path / "new" / "exp")
    ckpt = os.path.join(old, "train-a", "checkpoint_1")
    assert X.relative(old, ckpt) == "train-a/checkpoint_1"
    os.makedirs(os.path.join(new, "train-a", "checkpoint_1"))
    assert X.resolve(new, "train-a/checkpoint_1") == os.path.join(new, "train-a", "checkpoint_1")
    # An absolute path written before paths were relative, after the experiment moved:
    assert X.resolve(new, ckpt) == os.path.join(new, "train-a", "checkpoint_1")
    assert X.resolve(new, None) is None and X.resolve(new, float("nan")) is None


def test_checkpoint_damage_names_missing_and_empty_files():
    sizes = dict.fromkeys(X.CHECKPOINT_FILES, 10)
    assert X.checkpoint_damage(sizes) is None
    assert X.checkpoint_damage({**sizes, "model.pt": 0}) == "model.pt empty"
    del sizes["history.json"]
    assert X.checkpoint_damage(sizes) == "history.json missing"
