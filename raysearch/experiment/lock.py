"""One writer per experiment: the experiment's lock (a flock on a local disk, a lease in a bucket)."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from raysearch.errors import (
    ExperimentLockedError,
)
from raysearch.experiment.folder import LOCK_NAME
from raysearch.storage import (
    get_fs,
    is_url,
    join,
)

_LEASE_S = float(os.environ.get("RAYSEARCH_LOCK_LEASE_S", "120"))


class ExperimentLock:
    """One writer per experiment: ``with ExperimentLock(exp_dir, command="tune"): ...``.

    The lock is the file ``<exp_dir>/.raysearch.lock``, holding who holds it (host, pid, user,
    command, start time). A second run refuses with :class:`ExperimentLockedError` naming them.

    * Local folders: an exclusive ``flock`` on that file. The kernel drops it the moment its
      holder dies, so a SIGKILLed run never leaves a stale lock.
    * Buckets and other fsspec stores: a lease. The holder creates the file only if it does not
      exist (GCS ``ifGenerationMatch=0``), and a background thread renews ``expires`` every
      lease/4 seconds (``RAYSEARCH_LOCK_LEASE_S``, default 120). A lock whose lease has expired
      belongs to a dead run and is taken over. On stores without conditional writes the holder
      reads the file back after writing it, and backs off if another run's token is there.
    """

    def __init__(self, exp_dir: str, *, command: str, lease_s: float | None = None) -> None:
        self.exp_dir = exp_dir
        self.uri = join(exp_dir, LOCK_NAME)
        self.command = command
        self.lease_s = float(lease_s if lease_s is not None else _LEASE_S)
        self.token = uuid.uuid4().hex
        self._file = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self._created_dir = False

    # --- what is written into the lock file
    def _holder(self) -> dict[str, Any]:
        now = time.time()
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": _user(),
            "command": self.command,
            "started": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "expires": now + self.lease_s,
            "token": self.token,
        }

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if is_url(self.exp_dir):
            self._acquire_remote()
        else:
            self._acquire_local()

    def release(self) -> None:
        if is_url(self.exp_dir):
            self._release_remote()
        else:
            self._release_local()

    # --- local: flock
    def _acquire_local(self) -> None:
        import fcntl

        folder = self.exp_dir
        self._created_dir = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        f = open(self.uri, "a+")  # noqa: SIM115 - kept open while the lock is held
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _parse_holder(f.read())
            f.close()
            raise ExperimentLockedError(_locked_message(self.exp_dir, holder)) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(self._holder()))
        f.flush()
        self._file = f

    def _release_local(self) -> None:
        import fcntl

        if self._file is None:
            return
        f, self._file = self._file, None
        with contextlib.suppress(OSError):
            os.unlink(self.uri)  # while still holding it: nobody can be waiting on this inode
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
        if self._created_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.exp_dir)  # only if the run left nothing in it

    # --- remote: a lease
    def _acquire_remote(self) -> None:
        fs, path = get_fs(self.uri)
        for _ in range(3):
            current = _read_remote_holder(fs, path)
            if current is not None:
                holder, generation = current
                if float(holder.get("expires", 0)) > time.time():
                    raise ExperimentLockedError(_locked_message(self.exp_dir, holder))
                _remove_remote(fs, path, generation)  # expired: its holder is dead
            if not _create_remote(fs, path, json.dumps(self._holder()).encode()):
                continue  # someone else created it first: look again
            time.sleep(0.2)  # stores without conditional writes: last writer wins; check it
            current = _read_remote_holder(fs, path)
            if current is None or current[0].get("token") != self.token:
                raise ExperimentLockedError(
                    _locked_message(self.exp_dir, current[0] if current else None)
                )
            self._thread = threading.Thread(
                target=self._renew, args=(fs, path), name="raysearch-lock", daemon=True
            )
            self._thread.start()
            return
        raise ExperimentLockedError(_locked_message(self.exp_dir, None))

    def _renew(self, fs, path: str) -> None:
        while not self._stop.wait(self.lease_s / 4):
            current = _read_remote_holder(fs, path)
            if current is None or current[0].get("token") != self.token:
                self.lost = True  # taken over: the lease ran out while this run was stalled
                return
            holder = {**current[0], "expires": time.time() + self.lease_s}
            # A missed renewal is retried at the next tick; the lease has slack for three.
            with contextlib.suppress(Exception):
                fs.pipe_file(path, json.dumps(holder).encode())

    def _release_remote(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        fs, path = get_fs(self.uri)
        current = _read_remote_holder(fs, path)
        if current is not None and current[0].get("token") == self.token:
            _remove_remote(fs, path, current[1])


def lock_holder(exp_dir: str) -> dict[str, Any] | None:
    """Who holds the experiment's lock now (host, pid, user, command, started), or None when
    nobody does. Takes nothing: a local lock is probed with a shared, non-blocking ``flock`` that
    is dropped at once; a bucket's lease counts while it has not expired."""
    uri = join(exp_dir, LOCK_NAME)
    if is_url(exp_dir):
        fs, path = get_fs(uri)
        current = _read_remote_holder(fs, path)
        if current is None or float(current[0].get("expires", 0)) <= time.time():
            return None
        return current[0]
    import fcntl

    try:
        f = open(uri)  # noqa: SIM115 - closed below; never created here
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _parse_holder(f.read()) or {}
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return str(os.getuid())


def _parse_holder(text: str) -> dict[str, Any] | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _locked_message(exp_dir: str, holder: dict[str, Any] | None) -> str:
    if not holder:
        return f"experiment {exp_dir} is in use by another raysearch run; wait for it to finish"
    who = (
        f"`raysearch {holder.get('command', '?')}` on host {holder.get('host', '?')}, "
        f"pid {holder.get('pid', '?')}, user {holder.get('user', '?')}, "
        f"since {holder.get('started', '?')}"
    )
    return f"experiment {exp_dir} is in use by {who}; wait for it to finish or stop it"


def _read_remote_holder(fs, path: str) -> tuple[dict[str, Any], Any] | None:
    try:
        info = fs.info(path)
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    holder = _parse_holder(raw.decode("utf-8", "replace")) or {}
    return holder, info.get("generation")


def _create_remote(fs, path: str, data: bytes) -> bool:
    """Create ``path`` only if it does not exist; False when another writer got there first."""
    parent = path.rsplit("/", 1)[0]
    with contextlib.suppress(Exception):
        fs.makedirs(parent, exist_ok=True)
    try:
        if type(fs).__module__.startswith("gcsfs"):
            fs.pipe_file(path, data, mode="create")  # ifGenerationMatch=0
        else:
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
    except FileExistsError:
        return False
    except OSError as e:  # gcsfs reports a failed precondition (HTTP 412) as an OSError
        if "412" in str(e) or "recondition" in str(e):
            return False
        raise
    return True


def _remove_remote(fs, path: str, generation: Any) -> None:
    """Delete ``path``, on GCS only if it is still the generation that was read."""
    try:
        if generation is not None and type(fs).__module__.startswith("gcsfs"):
            bucket, key, _ = fs.split_path(path)
            fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(generation))
            fs.invalidate_cache(path)
        else:
            fs.rm_file(path)
    except (FileNotFoundError, FileExistsError):
        pass  # gone already, or (gcsfs: HTTP 412) replaced by another run since it was read
