"""Storage: one way to address local paths and fsspec URLs (gs://, memory://) everywhere.

Every stage reads and writes through these helpers so that a dataset, cache, weights file or
report can live in a bucket. Writes are atomic: data goes to a temporary name first and is then
renamed, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import io
import os
import re
import uuid
from pathlib import Path
from typing import Any

from raysearch.errors import ConfigError, StorageError, os_error_message

__all__ = [
    "RESERVED_NAMES",
    "atomic_write_bytes",
    "atomic_write_parquet",
    "atomic_write_text",
    "check_name",
    "check_storage_folder",
    "exists",
    "get_fs",
    "is_url",
    "join",
    "read_bytes",
    "read_parquet",
]


# Folders raysearch itself keeps in a storage root: an experiment may not take their names.
RESERVED_NAMES = ("cache",)
_NAME_MAX = 128
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=@,-]*$")


def check_storage_folder(uri: str, *, what: str = "storage") -> None:
    """Refuse a local ``uri`` that cannot become a folder: it, or a parent of it, is a file.

    URLs pass (a bucket prefix needs no folder). Raises :class:`ConfigError` naming ``what`` and
    the file in the way, so that ``--storage results.csv`` answers at once rather than inside Ray.
    """
    if is_url(uri):
        return
    path = Path(os.path.abspath(os.path.expanduser(str(uri).removeprefix("file://"))))
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == path else f"is under {p}, which is a file"
                raise ConfigError(f"{what}: {uri} {where}, not a folder")
            return


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


def is_url(path: str | os.PathLike) -> bool:
    """True for 'scheme://...' strings other than file://."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def get_fs(path: str | os.PathLike) -> tuple[Any, str]:
    """Return (filesystem, path inside it) for a local path or any fsspec URL.

    Raises :class:`StorageError` at once for a ``gs://`` URL whose endpoint does not resolve
    (offline): gcsfs would otherwise log tracebacks and retry for over a minute; and
    :class:`ConfigError` naming the URL for a scheme fsspec does not know (``foo://``) or whose
    package is not installed (``s3://`` without ``s3fs``).
    """
    s = str(path)
    if not is_url(s):
        s = os.path.abspath(os.path.expanduser(s.removeprefix("file://")))
    elif s.startswith(("gs://", "gcs://")):
        _check_gcs_reachable(s)
    from fsspec.core import url_to_fs
    from fsspec.registry import known_implementations

    scheme = s.split("://", 1)[0] if is_url(s) else "file"
    if scheme.split("::")[-1] not in known_implementations and "::" not in scheme:
        raise ConfigError(f"{s}: unknown URL scheme {scheme}:// (use a local path, gs://, or "
                          "another scheme fsspec knows)")
    try:
        return url_to_fs(s)
    except ImportError as e:  # e.g. "Install s3fs to access S3"
        reason = str(e).splitlines()[0] if str(e) else f"no package for {scheme}://"
        raise ConfigError(f"{s}: {reason[:1].lower()}{reason[1:]}") from None


_REACHABLE: dict[str, str | None] = {}  # host -> None (resolves) or why it does not


def _gcs_host() -> str:
    from urllib.parse import urlparse

    import fsspec

    endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or (
        fsspec.config.conf.get("gcs", {}).get("endpoint_url") or "https://storage.googleapis.com"
    )
    if "://" not in endpoint:
        endpoint = f"http://{endpoint}"
    return urlparse(endpoint).hostname or "storage.googleapis.com"


def _check_gcs_reachable(url: str, *, timeout_s: float = 5.0) -> None:
    """Resolve the GCS endpoint's host once per process (in a thread, with a timeout)."""
    import concurrent.futures
    import socket

    host = _gcs_host()
    if host not in _REACHABLE:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            pool.submit(socket.getaddrinfo, host, 443).result(timeout=timeout_s)
            _REACHABLE[host] = None
        except concurrent.futures.TimeoutError:
            _REACHABLE[host] = f"resolving {host} took over {timeout_s:g} s"
        except OSError as e:
            _REACHABLE[host] = f"{host} does not resolve ({e.strerror or e})"
        finally:
            pool.shutdown(wait=False)
    why = _REACHABLE[host]
    if why is not None:
        raise StorageError(f"cannot reach {url}: {why}; is this machine offline?")


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or URL, keeping the scheme."""
    s = str(base)
    if is_url(s):
        return "/".join([s.rstrip("/"), *[p.strip("/") for p in parts]])
    # Like the URL branch: a part with a leading "/" nests instead of restarting at the root.
    return str(
        Path(os.path.abspath(os.path.expanduser(s))).joinpath(*[p.strip("/") for p in parts])
    )


def exists(path: str | os.PathLike) -> bool:
    if not is_url(path):  # local paths need no fsspec (the GPU check runs without it)
        return os.path.exists(os.path.expanduser(str(path).removeprefix("file://")))
    fs, p = get_fs(path)
    return fs.exists(p)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a file. OS errors pass through: callers name what could not be read."""
    if not is_url(path):
        with open(os.path.expanduser(str(path).removeprefix("file://")), "rb") as f:
            return f.read()
    fs, p = get_fs(path)
    with fs.open(p, "rb") as f:
        return f.read()


def _storage_error(e: OSError, path: str | os.PathLike) -> BaseException:
    message = os_error_message(e, path=str(path))
    return StorageError(message) if message else e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` via a temporary sibling and a rename. Returns the path.

    A full disk, a missing permission or a read-only file system raises :class:`StorageError`
    ("no space left on <path>"), and neither a partial file nor the temporary one is left.
    """
    try:
        return _atomic_write_bytes(path, data)
    except OSError as e:
        raise _storage_error(e, path) from e


def _atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    s = str(path)
    if not is_url(s):
        final = Path(os.path.abspath(os.path.expanduser(s)))
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return str(final)
    fs, p = get_fs(s)
    parent = p.rsplit("/", 1)[0]
    tmp = f"{parent}/.{p.rsplit('/', 1)[-1]}.tmp-{uuid.uuid4().hex[:8]}"
    fs.makedirs(parent, exist_ok=True)
    # Object stores publish an object only when its upload completes, so readers never see a
    # partial file under the final name; the temporary name keeps the same rule on every backend.
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, p)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)
    return s


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_parquet(df: Any, path: str | os.PathLike, *, schema: Any = None) -> str:
    """Write a pandas DataFrame as Parquet, atomically; ``schema`` (a ``pyarrow.Schema``) fixes
    each column's type (see :mod:`raysearch.experiment.schema`), else pandas infers them.

    ``DataFrame.attrs`` (e.g. the reader's list of skipped images) is run-time information, not
    part of any file schema, and pandas cannot always serialise it: it is left out.
    """
    buf = io.BytesIO()
    if df.attrs:
        df = df.copy(deep=False)
        df.attrs = {}
    df.to_parquet(buf, index=False, schema=schema)
    return atomic_write_bytes(path, buf.getvalue())


def read_parquet(path: str | os.PathLike):
    import pandas as pd

    return pd.read_parquet(io.BytesIO(read_bytes(path)))


def ray_storage_args(uri: str | os.PathLike) -> dict[str, Any]:
    """``storage_path`` and ``storage_filesystem`` for a Ray Tune/Train ``RunConfig``.

    Remote URLs go through the same fsspec filesystem the rest of raysearch uses (one client and
    one configuration for data, cache, reports and checkpoints), wrapped for pyarrow, with the
    path given without its scheme as Ray expects. Local folders go through
    :class:`AtomicLocalFileSystem`: Ray copies its experiment state and every checkpoint into
    storage file by file, and a plain copy cut short by a full disk leaves a truncated experiment
    state over the last good one (a bucket publishes an object only when its upload completes).
    """
    import pyarrow.fs

    s = str(uri)
    if not is_url(s):
        return {
            "storage_path": os.path.abspath(os.path.expanduser(s)),
            "storage_filesystem": pyarrow.fs.PyFileSystem(
                pyarrow.fs.FSSpecHandler(atomic_local_filesystem())
            ),
        }
    fs, path = get_fs(s)
    return {
        "storage_path": path,
        "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)),
    }


def atomic_local_filesystem():
    """An fsspec local file system whose files opened for writing are written to a temporary
    sibling and renamed into place when closed: a reader (or a resume) sees the old file or the
    new one, never half of one. A write that fails (no space left) leaves the old file as it was
    and no temporary file behind. (A class made on first use: fsspec is imported lazily.)"""
    return _atomic_fs_class()()


_ATOMIC_FS: list = []


def _atomic_fs_class():
    if not _ATOMIC_FS:
        from fsspec.implementations.local import LocalFileSystem

        class AtomicLocalFileSystem(LocalFileSystem):
            def _open(self, path, mode="rb", block_size=None, **kwargs):
                if "w" not in mode:
                    return super()._open(path, mode, block_size=block_size, **kwargs)
                path = self._strip_protocol(path)
                self.makedirs(self._parent(path), exist_ok=True)
                return _AtomicFile(path, mode)

        AtomicLocalFileSystem.__module__ = __name__
        AtomicLocalFileSystem.__qualname__ = "AtomicLocalFileSystem"
        _ATOMIC_FS.append(AtomicLocalFileSystem)
    return _ATOMIC_FS[0]


def __getattr__(name: str):
    # Ray pickles the storage file system into an experiment (tuner.pkl) by this name.
    if name == "AtomicLocalFileSystem":
        return _atomic_fs_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _AtomicFile(io.RawIOBase):
    def __init__(self, path: str, mode: str) -> None:
        super().__init__()
        self.path = path
        self.tmp = os.path.join(os.path.dirname(path),
                                f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        self._f = open(self.tmp, mode)  # noqa: SIM115 - closed (and renamed) in close()
        self._failed = False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except BaseException:
            self._failed = True
            raise

    def flush(self) -> None:
        if not self._f.closed:
            self._f.flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            try:
                # No fsync: the rename protects readers from a half file if the writer dies; a
                # full disk already fails the write itself. (An fsync per file doubled the time
                # Ray spends saving checkpoints and experiment state.)
                self._f.flush()
            except BaseException:
                self._failed = True
                raise
            finally:
                self._f.close()
            if not self._failed:
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
            super().close()
