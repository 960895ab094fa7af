"""The experiment folder: its name, its layout, its marker, one writer at a time, and which of
the files in it raysearch will hand to Ray to unpickle.

An experiment lives at ``<storage>/<name>/`` (a local folder or a bucket prefix)::

    experiment.json          the marker: written by raysearch first, before anything else
    .raysearch.lock          held by the one run that writes the experiment (see ExperimentLock)
    raysearch-trust.json     HMAC-signed hashes of the Ray state files this machine wrote
    manifest.parquet         the data and the split
    search_space.yaml, trials.parquet, epochs.parquet, ensemble/
    train-<trial_id>/checkpoint_*/   each trial's checkpoints (Ray Train)
    tuner.pkl, experiment_state-*.json, searcher-state-*.pkl, ...   Ray Tune's own state

A **name** is one safe path component, wherever it comes from (a YAML file, ``--name``, a bench):
no separators, not ``.`` or ``..``, no control or glob characters. Before anything is removed,
:func:`remove_experiment` checks that the target is a direct child of the storage root and holds
the marker; callers remove only after every other check has passed.

Paths inside the experiment (checkpoints, the manifest) are stored relative to it, so a copied or
moved experiment (another disk, a bucket copied to a laptop) still works: :func:`resolve`.

**Trust.** ``Tuner.restore`` unpickles ``tuner.pkl``, the searcher state and the experiment state
(whose JSON carries cloudpickled objects), and Ray loads a failed trial's ``error.pkl``: whoever can
write the storage folder can run code on the machine that resumes the search. ``weights_only``
does not cover these. raysearch signs the SHA-256 of every such file it lets Ray write
(:func:`sign_ray_state`, an HMAC with a key kept outside the storage) and, before a resume,
refuses any such file it did not sign (:func:`verify_ray_state`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import getpass
import hashlib
import hmac
import io
import json
import os
import pickletools
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from raysearch.errors import (
    ConfigError,
    ExperimentLockedError,
    ExperimentStateError,
    RaysearchError,
    name_some,
)
from raysearch.storage import atomic_write_text, exists, get_fs, is_url, join, read_bytes

__all__ = [
    "CHECKPOINT_FILES",
    "LOCK_NAME",
    "MARKER",
    "RESERVED_NAMES",
    "TRUST_NAME",
    "ExperimentLock",
    "check_name",
    "check_ray_state_intact",
    "check_writable",
    "checkpoint_damage",
    "experiment_dir",
    "is_experiment",
    "read_info",
    "relative",
    "remove_experiment",
    "resolve",
    "sign_ray_state",
    "unfinished_trials",
    "update_info",
    "verify_ray_state",
]

MARKER = "experiment.json"
LOCK_NAME = ".raysearch.lock"
TRUST_NAME = "raysearch-trust.json"
# Folders raysearch itself keeps in a storage root: an experiment may not take their names.
RESERVED_NAMES = ("cache",)
_NAME_MAX = 128
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=@,-]*$")


# ----------------------------------------------------------------------------- names and layout


def check_name(name: Any, *, what: str = "experiment name") -> str:
    """Return ``name`` if it is one safe path component, else raise :class:`ConfigError`.

    Allowed: letters, digits and ``_ . + = @ , -``, not starting with ``.`` or ``-``, at most
    128 characters, and not a name raysearch keeps for itself (``cache``). This rules out
    separators, ``.`` and ``..``, control characters, and the glob and URL characters (``* ? [ #``)
    that fsspec would interpret.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > _NAME_MAX:
        raise ConfigError(f"{what} must be at most {_NAME_MAX} characters, got {len(name)}")
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"{what} must be one folder name of letters, digits and _.+=@,- (not starting with "
            f"'.' or '-'), got {name!r}"
        )
    if name in RESERVED_NAMES:
        raise ConfigError(f"{what} {name!r} is reserved (raysearch keeps <storage>/{name}/)")
    return name


def experiment_dir(storage: str, name: str) -> str:
    """``<storage>/<name>`` for a checked name (a local absolute path or a URL)."""
    return join(storage, check_name(name))


def is_experiment(exp_dir: str) -> bool:
    """True when ``exp_dir`` holds raysearch's marker file (``experiment.json``)."""
    return exists(join(exp_dir, MARKER))


def read_info(exp_dir: str) -> dict[str, Any]:
    """``experiment.json`` as a dict; :class:`ExperimentStateError` if missing or not JSON."""
    uri = join(exp_dir, MARKER)
    try:
        info = json.loads(read_bytes(uri))
    except FileNotFoundError:
        raise ExperimentStateError(f"{exp_dir} is not a raysearch experiment (no {MARKER})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ExperimentStateError(f"{uri} is not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise ExperimentStateError(f"{uri} does not hold a JSON object")
    return info


def update_info(exp_dir: str, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``experiment.json`` (created if missing), atomically. Returns it."""
    from raysearch import __version__

    try:
        info = read_info(exp_dir)
    except ExperimentStateError:
        info = {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    info.setdefault("raysearch", __version__)
    info.setdefault("created", now)
    info.update(fields)
    info["updated"] = now
    atomic_write_text(join(exp_dir, MARKER), json.dumps(info, indent=1, default=str))
    return info


def relative(exp_dir: str, uri: str | None) -> str | None:
    """``uri`` relative to ``exp_dir`` when it lies inside it (else unchanged)."""
    if uri is None:
        return None
    base = exp_dir.rstrip("/") + "/"
    return uri.removeprefix(base)


def resolve(exp_dir: str, path: str | None) -> str | None:
    """The URI of ``path`` as stored in an experiment's files, for the experiment at ``exp_dir``.

    Relative paths are joined onto ``exp_dir``. An absolute path or URL from an experiment that
    has since moved (experiments written before paths were relative) is re-rooted at ``exp_dir``
    from its ``train-<id>/...`` part, when the original is gone and the re-rooted one exists.
    """
    if not isinstance(path, str) or not path:
        return None  # None, or a NaN from a Parquet column
    if not (is_url(path) or os.path.isabs(path)):
        return join(exp_dir, path)
    if exists(path):
        return path
    parts = path.rstrip("/").split("/")
    for i, part in enumerate(parts):
        if part.startswith("train-"):
            moved = join(exp_dir, *parts[i:])
            if exists(moved):
                return moved
            break
    return path


def check_writable(exp_dir: str) -> None:
    """Refuse (:class:`ExperimentStateError`) to write an experiment into a folder that exists,
    holds anything besides a lock, and is not a raysearch experiment."""
    fs, path = get_fs(exp_dir)
    if not fs.exists(path) or is_experiment(exp_dir):
        return
    others = [c for c in fs.ls(path, detail=False) if c.rstrip("/").rsplit("/", 1)[-1] != LOCK_NAME]
    if others:
        raise ExperimentStateError(
            f"{exp_dir} exists and is not a raysearch experiment (no {MARKER}); choose another "
            "--name or storage"
        )


def remove_experiment(exp_dir: str, *, storage: str, dry_run: bool = False) -> None:
    """Delete an experiment's contents (its lock excepted), after checking that ``exp_dir`` is a
    direct child of ``storage`` and holds the marker. Raises :class:`ExperimentStateError` and
    deletes nothing otherwise. A folder that holds nothing but a lock counts as empty.
    ``dry_run`` makes the checks only: callers check first and delete after every other check.
    """
    parent = join(storage).rstrip("/")
    target = join(exp_dir).rstrip("/")
    name = target.rsplit("/", 1)[-1]
    if target.rsplit("/", 1)[0] != parent or name in ("", ".", "..") or target == parent:
        raise ExperimentStateError(
            f"refusing to delete {exp_dir}: it is not a folder directly inside the storage {storage}"
        )
    check_name(name)
    fs, path = get_fs(target)
    if not fs.exists(path):
        return
    children = [c for c in fs.ls(path, detail=False) if c.rstrip("/").rsplit("/", 1)[-1] != LOCK_NAME]
    if not children:
        return
    if not is_experiment(target):
        raise ExperimentStateError(
            f"refusing to delete {exp_dir}: it is not a raysearch experiment (no {MARKER}); "
            "choose another --name, or remove that folder yourself"
        )
    if dry_run:
        return
    # The marker goes last, so a deletion that dies half-way still leaves a recognisable experiment.
    marker = f"{path.rstrip('/')}/{MARKER}"
    for child in children:
        if child.rstrip("/") != marker:
            fs.rm(child, recursive=True)
    fs.rm(marker)


# Every file a trial checkpoint holds (see raysearch.train.checkpoint); none of them may be empty.
CHECKPOINT_FILES = ("model.pt", "train_state.pt", "trial.json", "metrics.json", "history.json",
                    "val_predictions.parquet")


def checkpoint_damage(sizes: dict[str, int]) -> str | None:
    """Why a trial checkpoint folder whose files have these sizes (name -> bytes) cannot be used
    (a file missing or empty: cut short by a full disk or a killed writer), or None."""
    missing = [n for n in CHECKPOINT_FILES if n not in sizes]
    if missing:
        return f"{', '.join(missing)} missing"
    empty = [n for n in CHECKPOINT_FILES if sizes[n] == 0]
    if empty:
        return f"{', '.join(empty)} empty"
    return None


# ----------------------------------------------------------------------------- trials and checkpoints


def run_checkpoints(run_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """(checkpoint URI, its metrics.json) for every usable checkpoint a Train run still holds.

    A checkpoint with a missing, empty or unreadable file (being written when the driver died, or
    cut short by a full disk) is left out: it is neither a resume point nor an ensemble member.
    """
    fs, path = get_fs(run_dir)
    if not fs.exists(path):
        return []
    out = []
    for entry in sorted(fs.ls(path, detail=False)):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("checkpoint_") or name.endswith(".json"):
            continue  # Ray keeps checkpoint_manager_snapshot.json beside the checkpoint folders
        uri = join(run_dir, name)
        try:
            sizes = {
                f["name"].rstrip("/").rsplit("/", 1)[-1]: int(f.get("size") or 0)
                for f in fs.ls(entry, detail=True)
            }
            if checkpoint_damage(sizes):
                continue
            metrics = json.loads(read_bytes(join(uri, "metrics.json")))
        except (OSError, ValueError):
            continue
        out.append((uri, metrics))
    return out

def latest_history(ckpts: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every epoch a Train run reported: the ``history.json`` of its latest checkpoint."""
    if not ckpts:
        return []
    latest_uri, _ = max(ckpts, key=lambda c: c[1]["epoch"])
    return json.loads(read_bytes(join(latest_uri, "history.json")))


# ----------------------------------------------------------------------------- finding experiments


def find_experiment(experiment: str | None, *, storage: str = "reports") -> str:
    """The experiment folder to ensemble: ``None`` -> the most recent one under ``storage``
    (newest ``experiment.json``); a bare name -> ``storage/name``; a path or URL as given."""
    if experiment is None:
        found = list_experiments(storage)
        if not found:
            raise ConfigError(
                f"no experiment under {storage} (no */experiment.json); run `raysearch tune` "
                "first or name one with --experiment"
            )
        return max(found, key=lambda item: (item[1], item[0]))[0]
    bare = not is_url(experiment) and "/" not in experiment and os.sep not in experiment
    candidates = [join(storage, experiment)] if bare else []
    candidates.append(experiment if is_url(experiment) else join(experiment))
    for path in candidates:
        if exists(join(path, "experiment.json")):
            return path
    known = [uri.rstrip("/").rsplit("/", 1)[-1] for uri, _ in list_experiments(storage)]
    listing = (
        f"experiments under {storage}: {name_some(sorted(known), limit=8)}"
        if known
        else f"there are none under {storage}"
    )
    raise ConfigError(f"no experiment at {candidates[0]} (no experiment.json); {listing}")

def list_experiments(storage: str) -> list[tuple[str, float]]:
    """(folder URI, modification time of its experiment.json) for every experiment in storage."""
    fs, root = get_fs(storage)
    if not fs.isdir(root):
        return []
    out = []
    for path in fs.glob(root.rstrip("/") + "/*/experiment.json"):
        name = path.rstrip("/").rsplit("/", 2)[-2]
        out.append((join(storage, name), _mtime(fs, path)))
    return out

def _mtime(fs, path: str) -> float:
    try:
        return fs.modified(path).timestamp()
    except (NotImplementedError, AttributeError, KeyError):
        info = fs.info(path)
        for key in ("mtime", "updated", "LastModified", "created"):
            value = info.get(key)
            if isinstance(value, (int, float)):
                return float(value)
            if hasattr(value, "timestamp"):
                return value.timestamp()
        return 0.0


# ----------------------------------------------------------------------------- one writer


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


# ----------------------------------------------------------------------------- trust


# Files Ray unpickles when a search is restored or its results are read back.
RAY_STATE_PATTERNS = (
    "tuner.pkl",
    "experiment_state-*.json",
    "searcher-state-*.pkl",
    "search_gen_state-*.json",
    "basic-variant-state-*.json",
    "callback-states-*.pkl",
    "*/error.pkl",
)
_KEEP_HASHES = 8  # per file: storage may still hold an older copy while a newer one uploads


def _trust_key() -> bytes:
    """The HMAC key: ``$RAYSEARCH_TRUST_KEY``, else ``~/.config/raysearch/trust.key`` (created
    with 32 random bytes and mode 0600 on first use). It never lives in the storage."""
    env = os.environ.get("RAYSEARCH_TRUST_KEY")
    if env:
        return env.encode()
    folder = os.path.join(os.path.expanduser("~"), ".config", "raysearch")
    path = os.path.join(folder, "trust.key")
    with contextlib.suppress(FileNotFoundError):
        with open(path, "rb") as f:
            key = f.read()
        if key:
            return key
    os.makedirs(folder, mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    try:
        os.link(tmp, path)  # first writer wins; a concurrent run reads the same key
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with open(path, "rb") as f:
        return f.read()


def _mac(files: dict[str, list[str]]) -> str:
    body = json.dumps(files, sort_keys=True).encode()
    return hmac.new(_trust_key(), body, hashlib.sha256).hexdigest()


def _state_files(root: str) -> dict[str, str]:
    """Relative name -> full path of every Ray state file under ``root`` (one level of trial
    folders deep)."""
    fs, path = get_fs(root)
    if not fs.exists(path):
        return {}
    base = path.rstrip("/")
    out = {}
    for found in fs.find(base, maxdepth=2, withdirs=False):
        found = found if found.startswith(base) else fs._strip_protocol(found)
        rel = found[len(base) + 1 :]
        if any(fnmatch.fnmatchcase(rel, p) for p in RAY_STATE_PATTERNS):
            out[rel] = join(root, rel)
    return out


def _read_trust(exp_dir: str) -> dict[str, list[str]]:
    """The signed hashes of ``exp_dir`` ({} when missing, or not signed with this machine's key)."""
    try:
        record = json.loads(read_bytes(join(exp_dir, TRUST_NAME)))
        files = record["files"]
        if hmac.compare_digest(str(record["mac"]), _mac(files)):
            return {str(k): [str(h) for h in v] for k, v in files.items()}
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass
    return {}


def _sha256(uri: str) -> str:
    return hashlib.sha256(read_bytes(uri)).hexdigest()


def sign_ray_state(exp_dir: str, *, source: str | None = None) -> int:
    """Sign the SHA-256 of every Ray state file in ``source`` (default ``exp_dir``; during a run,
    Ray's local staging folder, which it then copies to ``exp_dir``) into ``exp_dir``'s trust file.

    Earlier hashes of the same file are kept (up to 8), so a storage copy that is a save or two
    behind still verifies. Returns the number of files signed.
    """
    files = _read_trust(exp_dir)
    found = _state_files(source or exp_dir)
    changed = False
    for rel, uri in found.items():
        try:
            digest = _sha256(uri)
        except FileNotFoundError:
            continue  # replaced while we looked; the next save signs the new one
        known = files.setdefault(rel, [])
        if digest not in known:
            known.append(digest)
            del known[:-_KEEP_HASHES]
            changed = True
    if changed or not exists(join(exp_dir, TRUST_NAME)):
        record = {"files": files, "mac": _mac(files)}
        atomic_write_text(join(exp_dir, TRUST_NAME), json.dumps(record, indent=1))
    return len(found)


def verify_ray_state(exp_dir: str) -> None:
    """Refuse (:class:`ExperimentStateError`) to let Ray unpickle any state file in ``exp_dir``
    that raysearch did not sign on this machine (see the module docstring)."""
    signed = _read_trust(exp_dir)
    bad = []
    for rel, uri in sorted(_state_files(exp_dir).items()):
        if _sha256(uri) not in signed.get(rel, ()):
            bad.append(rel)
    if bad:
        why = (
            "it has no raysearch-trust.json signed with this machine's key"
            if not signed
            else "their contents differ from what raysearch wrote"
        )
        raise ExperimentStateError(
            f"refusing to resume {exp_dir}: Ray would unpickle {name_some(bad)}, and {why}. "
            "Unpickling runs code: resume only a folder you trust, with --trust-experiment "
            "(an experiment from another machine, or written by raysearch < 0.2)"
        )


def check_ray_state_intact(exp_dir: str) -> None:
    """Refuse (:class:`ExperimentStateError`) a saved search whose Ray state is damaged: an empty
    file, a pickle that ends early, an experiment state that is not complete JSON (a full disk
    leaves such files). Nothing is unpickled: pickles are only walked opcode by opcode."""
    damaged = []
    for rel, uri in sorted(_state_files(exp_dir).items()):
        raw = read_bytes(uri)
        reason = _damage(rel, raw)
        if reason:
            damaged.append(f"{rel} ({reason})")
    if not damaged:
        return
    states = sorted(r for r in _state_files(exp_dir) if r.startswith("experiment_state-"))
    hint = "run with --overwrite to start the search over"
    if len(states) > 1 and any(d.startswith(states[-1]) for d in damaged):
        hint += f", or delete {states[-1]} to resume from the state saved before it ({states[-2]})"
    raise ExperimentStateError(
        f"the saved search state in {exp_dir} is damaged: {name_some(damaged)}; it cannot be "
        f"resumed as it was, and raysearch will not start a smaller search in its place: {hint}"
    )


def _damage(rel: str, raw: bytes) -> str | None:
    if not raw:
        return "empty"
    if rel.endswith(".pkl") or rel.startswith(("search_gen_state-", "basic-variant-state-")):
        if rel.startswith("basic-variant-state-"):
            return None
        try:
            for _ in pickletools.genops(io.BytesIO(raw)):
                pass
        except Exception as e:  # noqa: BLE001 - any parse failure means a damaged pickle
            return f"truncated or not a pickle: {str(e)[:60]}"
        return None
    try:
        json.loads(raw)
    except ValueError:
        return "incomplete JSON"
    return None


def unfinished_trials(exp_dir: str) -> set[str]:
    """Ids of the trials that Ray's newest saved experiment state records as not ended (PENDING,
    RUNNING or PAUSED): what a resume would continue. Read as plain JSON, nothing unpickled."""
    states = sorted(r for r in _state_files(exp_dir) if r.startswith("experiment_state-"))
    if not states:
        return set()
    try:
        state = json.loads(read_bytes(join(exp_dir, states[-1])))
        out = set()
        for trial_json, _ in state["trial_data"]:
            trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
            if trial.get("status") in ("PENDING", "RUNNING", "PAUSED"):
                out.add(str(trial["trial_id"]))
        return out
    except (ValueError, KeyError, TypeError):
        return set()


@contextlib.contextmanager
def fail_on_restore_error() -> Iterator[None]:
    """While active, Ray Tune's "Failed to restore the run state" (after which Ray would start a
    new, empty search in the restored one's place) raises :class:`ExperimentStateError` instead."""
    import logging

    class _Tripwire(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Failed to restore the run state"):
                cause = record.exc_info[1] if record.exc_info else None
                raise ExperimentStateError(
                    "Ray could not restore the saved search state"
                    + (f" ({cause})" if cause else "")
                    + "; raysearch will not start a smaller search in its place: run with "
                    "--overwrite to start over"
                ) from cause

    logger = logging.getLogger("ray.tune.execution.tune_controller")
    handler = _Tripwire(level=logging.ERROR)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def raysearch_error_in(error: BaseException) -> RaysearchError | None:
    """The first :class:`RaysearchError` in ``error``'s cause/context chain, if any."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RaysearchError):
            return e
        e = e.__cause__ or e.__context__
    return None
