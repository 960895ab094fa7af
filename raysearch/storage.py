"""Storage: one way to address local paths and fsspec URLs (gs://, memory://) everywhere.

Every stage reads and writes through these helpers so that a dataset, cache, weights file or
report can live in a bucket. Writes are atomic: data goes to a temporary name first and is then
renamed, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

__all__ = [
    "atomic_write_bytes",
    "atomic_write_parquet",
    "atomic_write_text",
    "exists",
    "get_fs",
    "is_url",
    "join",
    "read_bytes",
    "read_parquet",
]


def is_url(path: str | os.PathLike) -> bool:
    """True for 'scheme://...' strings other than file://."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def get_fs(path: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path inside it) for a local path or any fsspec URL."""
    s = str(path)
    if not is_url(s):
        s = os.path.abspath(os.path.expanduser(s.removeprefix("file://")))
    return url_to_fs(s)


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
    fs, p = get_fs(path)
    return fs.exists(p)


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, p = get_fs(path)
    with fs.open(p, "rb") as f:
        return f.read()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` via a temporary sibling and a rename. Returns the path."""
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


def atomic_write_parquet(df: Any, path: str | os.PathLike) -> str:
    """Write a pandas DataFrame as Parquet, atomically.

    ``DataFrame.attrs`` (e.g. the reader's list of skipped images) is run-time information, not
    part of any file schema, and pandas cannot always serialise it: it is left out.
    """
    buf = io.BytesIO()
    if df.attrs:
        df = df.copy(deep=False)
        df.attrs = {}
    df.to_parquet(buf, index=False)
    return atomic_write_bytes(path, buf.getvalue())


def read_parquet(path: str | os.PathLike):
    import pandas as pd

    return pd.read_parquet(io.BytesIO(read_bytes(path)))


def ray_storage_args(uri: str | os.PathLike) -> dict[str, Any]:
    """``storage_path`` (and ``storage_filesystem``) for a Ray Tune/Train ``RunConfig``.

    Remote URLs go through the same fsspec filesystem the rest of raysearch uses (one client and
    one configuration for data, cache, reports and checkpoints), wrapped for pyarrow, with the
    path given without its scheme as Ray expects.
    """
    s = str(uri)
    if not is_url(s):
        return {"storage_path": os.path.abspath(os.path.expanduser(s))}
    import pyarrow.fs

    fs, path = get_fs(s)
    return {
        "storage_path": path,
        "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)),
    }
