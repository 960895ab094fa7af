"""Which files of an experiment raysearch will hand to Ray to unpickle (signed hashes), whether
Ray's saved state is intact, and what it records as unfinished."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import hmac
import io
import json
import os
import pickletools
import secrets
import uuid
from collections.abc import Iterator

from raysearch.errors import (
    ExperimentStateError,
    RaysearchError,
    name_some,
)
from raysearch.experiment.folder import TRUST_NAME
from raysearch.storage import (
    atomic_write_text,
    exists,
    get_fs,
    join,
    read_bytes,
)

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
