"""Test support for the storage stage: a local Google Cloud Storage stand-in.

The session fixture ``gcs_emulator`` starts the PyPI ``gcp-storage-emulator`` on loopback in a
subprocess, with one in-memory bucket, and points every ``gs://`` URL of the test session at it:

* ``STORAGE_EMULATOR_HOST`` is the emulator's endpoint. gcsfs reads it whenever a filesystem
  instance is created, so ``raysearch.storage.get_fs("gs://bucket/x")`` (fsspec ``url_to_fs``)
  talks to the emulator. Being an environment variable, it also reaches subprocesses started
  later (Ray workers of a session Ray instance started after this fixture).
* ``FSSPEC_GCS_TOKEN=anon`` and ``fsspec.config.conf["gcs"]["token"] = "anon"``: no credential
  lookup (no Application Default Credentials, no probing of a GCE metadata server).
* ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: otherwise recent gcsfs probes the bucket type over
  gRPC/TLS and waits 60 s per call. gcsfs reads it when it is *imported*, so this module also sets
  it on import, before a test can import gcsfs.

Use it from a test module with ``from tests.gcs_emulator import gcs_emulator  # noqa: F401`` (or
through conftest), then ask for ``gcs_emulator`` and build URLs with ``gcs_emulator.url("a", "b")``.

What works against the emulator (checked with gcsfs 2026.10, pyarrow 26, emulator 2026.7; the
tests in ``test_storage.py`` keep checking it):
* gcsfs, directly (``gcs_emulator.fs``) or through any ``gs://`` URL;
* ``pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(gcs_emulator.fs))``, which is what
  ``raysearch.storage.ray_storage_args`` hands to Ray Tune/Train as ``storage_filesystem``;
* pyarrow's own client built by hand:
  ``pyarrow.fs.GcsFileSystem(endpoint_override="127.0.0.1:PORT", scheme="http", anonymous=True)``.
  A bare ``storage_path="gs://..."`` does *not* reach the emulator: Ray resolves it with
  ``pyarrow.fs.FileSystem.from_uri``, whose URI options have no ``anonymous`` switch, so it asks
  for Google credentials. Tests that run Ray against the emulator must pass a filesystem.

The emulator does not implement the JSON API's ``objects.move`` (``.../o/SRC/moveTo/o/DST``),
which gcsfs tries first on every ``mv``. It answers 501, which gcsfs retries with backoff for
about 34 s before falling back to copy + delete. The subprocess therefore runs this file as a
script that adds a ``moveTo`` route (copy + delete inside the emulator, as on real GCS) and then
starts the emulator exactly as ``python -m gcp_storage_emulator start`` would.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

# Must be in place before gcsfs is first imported (see the module docstring).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

BUCKET = "raysearch-test"
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class GcsEmulator:
    """A running emulator: its endpoint, its bucket and a gcsfs filesystem bound to it."""

    endpoint: str
    bucket: str
    fs: Any  # gcsfs.GCSFileSystem

    def url(self, *parts: str) -> str:
        """``gs://<bucket>/<parts...>``."""
        return "/".join([f"gs://{self.bucket}", *[p.strip("/") for p in parts if p]])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 20) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def _wait_until_up(proc: subprocess.Popen, endpoint: str, log_path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"gcp-storage-emulator exited with code {proc.returncode} before answering on "
                f"{endpoint}:\n{_tail(log_path)}"
            )
        try:
            # "/" is the emulator's health check; the bucket listing also proves that the
            # default bucket exists.
            with urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(
        f"gcp-storage-emulator did not answer on {endpoint} within {START_TIMEOUT_S:.0f} s:\n"
        f"{_tail(log_path)}"
    )


@contextlib.contextmanager
def run_emulator(*, bucket: str = BUCKET) -> Iterator[GcsEmulator]:
    """Run the emulator on a free loopback port until the block exits.

    Only starts the process and yields a filesystem bound to it by ``endpoint_url``; it does not
    touch the environment (the ``gcs_emulator`` fixture does that).
    """
    try:
        import gcp_storage_emulator  # noqa: F401
    except ImportError:
        pytest.fail(
            "the GCS tests need the PyPI package gcp-storage-emulator: "
            "pip install -e '.[test]' (or pip install gcp-storage-emulator)"
        )
    import gcsfs

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile(
        "w", prefix="gcs-emulator-", suffix=".log", delete=False
    ) as log:
        log_path = log.name
    args = [
        sys.executable,
        os.path.abspath(__file__),
        "start",
        "--host=127.0.0.1",
        f"--port={port}",
        "--in-memory",
        f"--default-bucket={bucket}",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        _wait_until_up(proc, endpoint, log_path)
        fs = gcsfs.GCSFileSystem(endpoint_url=endpoint, token="anon", skip_instance_cache=True)
        yield GcsEmulator(endpoint=endpoint, bucket=bucket, fs=fs)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.unlink(log_path)


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    """One emulator per test session; every ``gs://`` URL in the session goes to it."""
    import fsspec.config
    import gcsfs

    with run_emulator() as emulator, pytest.MonkeyPatch.context() as mp:
        mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        mp.setenv("STORAGE_EMULATOR_HOST", emulator.endpoint)
        mp.setenv("FSSPEC_GCS_TOKEN", "anon")  # for subprocesses; fsspec reads it on import
        mp.setitem(
            fsspec.config.conf, "gcs", {**fsspec.config.conf.get("gcs", {}), "token": "anon"}
        )
        # fsspec caches filesystem instances: drop any made before the emulator existed.
        gcsfs.GCSFileSystem.clear_instance_cache()
        yield emulator
        gcsfs.GCSFileSystem.clear_instance_cache()


# ----------------------------------------------------------------------------- emulator process


def _add_move_route() -> None:
    """Teach the emulator ``objects.move`` (POST .../b/B/o/SRC/moveTo/o/DST) as copy + delete.

    Uses the emulator's own copy and delete helpers. If a future emulator renames them, the
    route is not added and gcsfs falls back to copy + delete after its retries: slower, still
    correct.
    """
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    copy, delete = getattr(objects, "_copy", None), getattr(objects, "_delete", None)
    if copy is None or delete is None:
        return

    def move(request, response, storage, *args, **kwargs):
        p = request.params
        try:
            dest = copy(
                request.base_url,
                storage,
                p["bucket_name"],
                p["object_id"],
                p["bucket_name"],
                p["dest_object_id"],
            )
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        delete(storage, p["bucket_name"], p["object_id"])
        response.json(dest)

    pattern = (
        r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
        r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$"
    )
    route = (pattern, {"POST": move})
    # The router walks this tuple on every request; the generic object route would otherwise
    # swallow ".../moveTo/..." and answer 501.
    server.HANDLERS = (route, *server.HANDLERS)


if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    _add_move_route()
    main(sys.argv[1:])
