"""Tests for the storage stage: the same checks against a local path, memory:// and gs:// (emulator)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pandas as pd
import pytest

from raysearch import storage
from raysearch.errors import StorageError
from tests.gcs_emulator import GcsEmulator, gcs_emulator  # noqa: F401  (session fixture)

BACKENDS = ["local", "memory", "gcs"]


@pytest.fixture(params=BACKENDS)
def root(request, tmp_path) -> Iterator[str]:
    """A fresh, empty directory (or prefix) on one backend."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    if request.param == "local":
        yield str(tmp_path / name)
    elif request.param == "memory":
        base = f"memory://raysearch-tests/{name}"
        yield base
        fs, path = storage.get_fs(base)  # memory:// lives as long as the process: clean up
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        emulator: GcsEmulator = request.getfixturevalue("gcs_emulator")
        yield emulator.url(name)


def all_files(base: str) -> list[str]:
    """Every file below ``base`` (relative names), temporary ones included."""
    fs, path = storage.get_fs(base)
    if not fs.exists(path):
        return []
    return sorted(p[len(path.rstrip("/")) + 1 :] for p in fs.find(path, withdirs=False))


# ----------------------------------------------------------------------------- round trips


def test_atomic_write_bytes_round_trip(root):
    target = storage.join(root, "sub", "blob.bin")
    data = bytes(range(256)) * 64

    returned = storage.atomic_write_bytes(target, data)

    assert storage.read_bytes(returned) == data
    assert storage.read_bytes(target) == data
    assert all_files(root) == ["sub/blob.bin"]


def test_atomic_write_text_round_trip_is_utf8(root):
    target = storage.join(root, "notes.txt")
    text = "study1_positive — Ärzte, 肘\n"

    storage.atomic_write_text(target, text)

    assert storage.read_bytes(target) == text.encode("utf-8")


def test_atomic_write_parquet_round_trip(root):
    target = storage.join(root, "reports", "trials.parquet")
    df = pd.DataFrame(
        {
            "study_id": ["MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive", "s2"],
            "body_part": ["WRIST", "ELBOW"],
            "label": [1, 0],
            "prob": [0.875, 0.125],
        }
    )

    storage.atomic_write_parquet(df, target)

    pd.testing.assert_frame_equal(storage.read_parquet(target), df)
    assert all_files(root) == ["reports/trials.parquet"]


def test_overwrite_replaces_content(root):
    target = storage.join(root, "state.json")
    storage.atomic_write_text(target, '{"epoch": 1}')
    storage.atomic_write_text(target, '{"epoch": 2}')

    assert storage.read_bytes(target) == b'{"epoch": 2}'
    assert all_files(root) == ["state.json"]


# ----------------------------------------------------------------------------- join / exists


def test_join_keeps_the_scheme_and_nests(root):
    joined = storage.join(root + "/", "/a/", "b.txt")

    if storage.is_url(root):
        assert joined == f"{root}/a/b.txt"
    else:
        assert joined == os.path.join(root, "a", "b.txt")
    storage.atomic_write_text(joined, "x")
    assert all_files(root) == ["a/b.txt"]


def test_exists(root):
    target = storage.join(root, "d", "f.txt")
    assert not storage.exists(target)

    storage.atomic_write_text(target, "x")

    assert storage.exists(target)
    assert storage.exists(storage.join(root, "d"))
    assert not storage.exists(storage.join(root, "d", "g.txt"))


def test_read_missing_file_raises_file_not_found(root):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing.bin"))


# ----------------------------------------------------------------------------- failed writes


def _break_upload(monkeypatch, target: str) -> None:
    """Make the next write to ``target``'s backend fail half way through the data."""
    if not storage.is_url(target):
        # The local path writes the temporary file, then fsyncs it: fail like a full disk.
        def fsync(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", fsync)
        return
    fs, _ = storage.get_fs(target)  # fsspec caches instances: this is the one the write uses
    real_open = fs.open

    def open_(path, mode="rb", **kwargs):
        f = real_open(path, mode, **kwargs)
        if "w" in mode:
            real_write = f.write

            def write(data):
                real_write(data[: len(data) // 2])
                raise OSError("connection reset while uploading")

            f.write = write
        return f

    monkeypatch.setattr(fs, "open", open_)


def _break_rename(monkeypatch, target: str) -> None:
    """Make the final rename of ``target``'s backend fail after the data is written."""

    def fail(*args, **kwargs):
        raise OSError("rename failed")

    if not storage.is_url(target):
        monkeypatch.setattr(os, "replace", fail)
        return
    fs, _ = storage.get_fs(target)
    monkeypatch.setattr(fs, "mv", fail)


@pytest.mark.parametrize("break_at", [_break_upload, _break_rename], ids=["upload", "rename"])
def test_failed_write_leaves_no_file_and_no_temp(root, monkeypatch, break_at):
    target = storage.join(root, "out", "probs.parquet")
    storage.atomic_write_text(storage.join(root, "out", "keep.txt"), "unrelated")

    with monkeypatch.context() as m:
        break_at(m, target)
        with pytest.raises(OSError):
            storage.atomic_write_bytes(target, b"0123456789" * 100)

    assert not storage.exists(target)
    assert all_files(root) == ["out/keep.txt"]


@pytest.mark.parametrize("break_at", [_break_upload, _break_rename], ids=["upload", "rename"])
def test_failed_overwrite_keeps_the_old_content(root, monkeypatch, break_at):
    target = storage.join(root, "manifest.parquet")
    storage.atomic_write_bytes(target, b"old")

    with monkeypatch.context() as m:
        break_at(m, target)
        with pytest.raises(OSError):
            storage.atomic_write_bytes(target, b"new content")

    assert storage.read_bytes(target) == b"old"
    assert all_files(root) == ["manifest.parquet"]


def test_failed_dataframe_conversion_writes_nothing(root):
    # The data producer fails: an object column that Parquet cannot encode.
    df = pd.DataFrame({"study_id": ["s1", "s2"], "prob": [object(), object()]})
    target = storage.join(root, "bad.parquet")

    with pytest.raises((TypeError, ValueError)):  # pyarrow: ArrowInvalid / ArrowTypeError
        storage.atomic_write_parquet(df, target)

    assert all_files(root) == []


# ----------------------------------------------------------------------------- Ray storage handoff


def test_ray_storage_args_filesystem_writes_where_get_fs_reads(root):
    """What Ray Train/Tune get for a storage URI lands where the rest of raysearch reads."""
    import pyarrow.fs

    args = storage.ray_storage_args(root)
    path = args["storage_path"]
    fs = args.get("storage_filesystem")
    if fs is None:  # local: Ray writes with its own local filesystem
        assert not storage.is_url(root) and os.path.isabs(path)
        fs = pyarrow.fs.LocalFileSystem()
    fs.create_dir(f"{path}/train-abc/checkpoint_000000")
    with fs.open_output_stream(f"{path}/train-abc/checkpoint_000000/model.pt") as f:
        f.write(b"weights")

    # raysearch addresses Ray's files by joining onto the storage URI it started from.
    assert storage.read_bytes(storage.join(root, "train-abc", "checkpoint_000000", "model.pt")) == (
        b"weights"
    )


def test_pyarrow_native_gcs_client_reaches_the_emulator(gcs_emulator):  # noqa: F811
    """pyarrow's own GCS client works against the emulator when built with its options."""
    import pyarrow.fs

    host = gcs_emulator.endpoint.removeprefix("http://")
    fs = pyarrow.fs.GcsFileSystem(endpoint_override=host, scheme="http", anonymous=True)
    name = f"t-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(f"{gcs_emulator.bucket}/{name}/a.bin") as f:
        f.write(b"from pyarrow")
    fs.move(f"{gcs_emulator.bucket}/{name}/a.bin", f"{gcs_emulator.bucket}/{name}/b.bin")

    assert storage.read_bytes(gcs_emulator.url(name, "b.bin")) == b"from pyarrow"
    assert not storage.exists(gcs_emulator.url(name, "a.bin"))


def test_gs_urls_go_to_the_emulator(gcs_emulator):  # noqa: F811
    """Code that only sees a gs:// URL talks to the emulator, not to Google."""
    url = gcs_emulator.url("routing", "x.txt")
    storage.atomic_write_text(url, "here")

    assert gcs_emulator.fs.cat(f"{gcs_emulator.bucket}/routing/x.txt") == b"here"


def test_subprocesses_reach_the_emulator_too(gcs_emulator):  # noqa: F811
    """Processes started during the session (e.g. Ray workers) inherit the routing via env."""
    url = gcs_emulator.url("routing", "from-child.txt")
    code = f"from raysearch import storage; storage.atomic_write_text({url!r}, 'child')"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

    assert storage.read_bytes(url) == b"child"


@pytest.mark.parametrize("code, expected", [
    (errno.ENOSPC, "no space left on /x/y"),
    (errno.EACCES, "permission denied: /x/y"),
    (errno.EROFS, "read-only file system: /x/y"),
    (errno.ENOENT, "no such file or folder: /x/y"),
    (errno.ENOTDIR, "not a folder (a file is in the way): /x/y"),
    (errno.EISDIR, "is a folder, not a file: /x/y"),
    (errno.EEXIST, "already exists: /x/y"),
    (errno.ENAMETOOLONG, "file name too long: /x/y"),
])
def test_os_errors_a_user_can_act_on_read_as_one_line_naming_the_path(code, expected):
    from raysearch.errors import os_error_message

    assert os_error_message(OSError(code, os.strerror(code), "/x/y")) == expected
    # Without a path, only the kinds that make sense alone are named ("the storage").
    alone = os_error_message(OSError(code, os.strerror(code)))
    assert (alone is None) == (code in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                                        errno.EEXIST, errno.ENAMETOOLONG))


def test_a_write_under_a_file_is_a_storage_error_naming_the_path(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match=f"already exists: {tmp_path}/f"):
        storage.atomic_write_text(str(tmp_path / "f" / "out.txt"), "hi")


def test_a_url_scheme_that_cannot_be_opened_is_a_config_error_naming_the_url():
    from raysearch.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^foo://b/x: unknown URL scheme foo://"):
        storage.get_fs("foo://b/x")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"^s3://b/x: install s3fs"):
            storage.get_fs("s3://b/x")
    assert storage.get_fs("memory://b/x")[1] == "/b/x"
