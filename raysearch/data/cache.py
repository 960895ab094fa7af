"""Data stage, the cache: decode every image once into a compact uint8 store.

Training batches are served from the store by :class:`raysearch.data.loader.BatchLoader`.

Decoding and resizing PNGs on the fly starves accelerators, and under Ray Tune every trial would
redo it for its own copy (ray-project/ray#28171). Instead each image is decoded once per
(manifest, image size, preprocessing version) and trials memory-map the result.

Store layout, under ``<cache_dir>/<key>/`` (``key`` from :func:`cache_key`):

- ``images.u8``      raw ``n * S * S`` bytes, row ``r`` is image ``r`` (grayscale, letterboxed)
- ``index.parquet``  columns ``image_path`` (str), ``row`` (int64), in manifest order
- ``meta.json``      ``key``, ``image_size``, ``n``, ``preprocess_version``, ``created``, ``skipped``

A store is built in a temporary sibling directory and renamed into place, so a directory under
the final name is always complete and two processes building the same store cannot corrupt it.
When ``cache_dir`` is a URL (gs://, memory://) the store is built in a node-local directory
(``$RAYSEARCH_LOCAL_CACHE`` or ``~/.cache/raysearch``), uploaded with ``meta.json`` last (its
presence marks a complete upload), and downloaded once per node when opened elsewhere.

``skip_bad``: the key depends only on the manifest's paths and the image size. With
``skip_bad=True`` images that fail to decode are left out of the store and listed in
``meta.json["skipped"]``; asking for them with :meth:`ImageCache.rows_for` raises. Opening such a
store with ``skip_bad=False`` raises too, so undecodable data never disappears silently.
"""

from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from datetime import datetime, timezone
from hashlib import sha256
from typing import Any

import numpy as np
import pandas as pd

from raysearch.data.images import PREPROCESS_VERSION, preprocess_image
from raysearch.errors import ConfigError, DataError, name_some
from raysearch.storage import atomic_write_bytes, exists, get_fs, is_url, join

__all__ = [
    "PREPROCESS_VERSION",
    "ArrayStore",
    "ImageCache",
    "build_cache",
    "cache_bytes",
    "cache_key",
    "open_cache",
    "preprocess_image",
]


_FILES = ("images.u8", "index.parquet", "meta.json")  # meta.json last: it marks completeness


# ----------------------------------------------------------------------------- preprocessing


def cache_bytes(n_images: int, image_size: int) -> int:
    """Bytes of a store's ``images.u8`` for ``n_images`` images of ``image_size`` px: n * S * S.

    One uint8 per pixel of each square grayscale image; ``index.parquet`` and ``meta.json`` add
    a few dozen bytes per image. The build writes into a temporary sibling that is renamed into
    place (no second copy); with a URL ``cache_dir`` the store is kept both in the node-local
    cache and in the bucket. Raises ConfigError for a negative count or a size below 1.
    """
    if n_images < 0:
        raise ConfigError(f"n_images must be >= 0, got {n_images!r}")
    if image_size < 1:
        raise ConfigError(f"image_size must be >= 1, got {image_size!r}")
    return int(n_images) * int(image_size) ** 2


def cache_key(image_paths: Sequence[str], *, image_size: int) -> str:
    """Short sha256 fingerprint of the ordered paths, the image size and the preprocess version."""
    h = sha256(f"raysearch-cache v{PREPROCESS_VERSION} size={image_size}\n".encode())
    for p in image_paths:
        h.update(str(p).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:20]


# ----------------------------------------------------------------------------- opened store


class ImageCache:
    """An opened store: ``images`` is a read-only ``(n, S, S)`` uint8 memmap, ``index`` maps
    ``image_path`` to ``row``. ``path`` is the local directory, ``source`` where the store lives
    (the same directory, or its URL)."""

    def __init__(self, path: str, *, source: str | None = None) -> None:
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise DataError(f"not a complete cache store (no meta.json): {path}; delete it")
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("preprocess_version") != PREPROCESS_VERSION:
            raise DataError(
                f"cache store {path} has preprocess version {meta.get('preprocess_version')}, "
                f"this raysearch writes {PREPROCESS_VERSION}; delete it"
            )
        self.key: str = meta["key"]
        self.image_size: int = int(meta["image_size"])
        self.path = path
        self.source = source or path
        self.meta: dict[str, Any] = meta
        self.skipped: list[str] = list(meta.get("skipped", []))
        n, s = int(meta["n"]), self.image_size
        images_path = os.path.join(path, "images.u8")
        size = os.path.getsize(images_path) if os.path.isfile(images_path) else -1
        if size != n * s * s:
            raise DataError(
                f"cache store {path}: images.u8 has {size} bytes, expected {n}x{s}x{s}; delete it"
            )
        self.images: np.ndarray = np.memmap(images_path, dtype=np.uint8, mode="r", shape=(n, s, s))
        self.index: pd.DataFrame = pd.read_parquet(os.path.join(path, "index.parquet"))
        if len(self.index) != n:
            raise DataError(f"cache store {path}: index has {len(self.index)} rows, expected {n}")
        self._lookup = pd.Index(self.index["image_path"])

    def rows_for(self, image_paths: Sequence[str]) -> np.ndarray:
        """Store rows (int64) for ``image_paths``, in their order."""
        rows = self._lookup.get_indexer(list(image_paths))
        missing = [p for p, r in zip(image_paths, rows) if r < 0]
        if missing:
            skipped = set(self.skipped)
            why = (
                f" ({sum(p in skipped for p in missing)} left out as undecodable)"
                if skipped and any(p in skipped for p in missing)
                else ""
            )
            raise DataError(
                f"{len(missing)} image paths are not in cache store {self.source}{why}: "
                f"{name_some(missing)}"
            )
        return rows.astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        skipped = f", skipped={len(self.skipped)}" if self.skipped else ""
        return (
            f"ImageCache(key={self.key!r}, n={len(self)}, image_size={self.image_size}"
            f"{skipped}, source={self.source!r})"
        )

    def __reduce__(self):
        # Pickle as "reopen the memmap", never as a copy of the pixels.
        return (_reopen, (self.path, self.source))


class ArrayStore:
    """An in-memory store with :class:`ImageCache`'s interface: ``images`` ``[n, S, S]`` uint8,
    ``image_size``, ``rows_for`` by ``paths``. For benches and tests that generate their images
    instead of decoding a dataset."""

    def __init__(self, images: np.ndarray, paths: Sequence[str] | None = None) -> None:
        images = np.asarray(images)
        if images.ndim != 3 or images.shape[1] != images.shape[2] or images.dtype != np.uint8:
            raise DataError(f"expected uint8 images [n, S, S], got {images.dtype} {images.shape}")
        self.images = images
        self.image_size = int(images.shape[1])
        self.paths = list(paths) if paths is not None else [f"img{i}" for i in range(len(images))]
        self._lookup = pd.Index(self.paths)

    def rows_for(self, image_paths: Sequence[str]) -> np.ndarray:
        rows = self._lookup.get_indexer(list(image_paths))
        if (rows < 0).any():
            raise DataError(f"{int((rows < 0).sum())} image paths are not in this store")
        return rows.astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)


def _reopen(path: str, source: str) -> ImageCache:
    return ImageCache(path, source=source)


def open_cache(cache_dir: str, key: str) -> ImageCache:
    """Open an existing store ``<cache_dir>/<key>``, downloading it once per node from a URL."""
    if not is_url(cache_dir):
        path = join(cache_dir, key)
        if not os.path.isdir(path):
            raise DataError(f"no cache store {key} in {cache_dir}")
        return ImageCache(path)
    remote = join(cache_dir, key)
    if not exists(join(remote, "meta.json")):
        raise DataError(f"no complete cache store at {remote}")
    return ImageCache(_download(remote, key=key), source=remote)


# ----------------------------------------------------------------------------- building


def build_cache(
    manifest: pd.DataFrame,
    *,
    image_size: int,
    cache_dir: str,
    num_workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> ImageCache:
    """Decode every ``manifest["image_path"]`` once into a store, or open the store if it exists.

    Returns the opened store; its ``index`` follows the manifest's row order. Images that fail to
    decode raise :class:`DataError` naming them, unless ``skip_bad`` (see the module docstring).
    ``num_workers`` decode processes (default: one per CPU; small manifests decode in-process).
    """
    paths = _manifest_paths(manifest)
    if image_size < 1:
        raise ConfigError(f"image_size must be >= 1, got {image_size}")
    if num_workers is not None and num_workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
    key = cache_key(paths, image_size=image_size)
    build = {
        "paths": paths,
        "key": key,
        "image_size": image_size,
        "num_workers": num_workers,
        "skip_bad": skip_bad,
        "progress": progress,
    }
    if not is_url(cache_dir):
        final = join(cache_dir, key)
        if not os.path.isdir(final):
            _build_local(parent=join(cache_dir), **build)
        cache = ImageCache(final)
    else:
        remote = join(cache_dir, key)
        if exists(join(remote, "meta.json")):
            local = _download(remote, key=key)
        else:
            local = os.path.join(_local_root(), key)
            if not os.path.isdir(local):  # a local build whose upload did not finish is reused
                _build_local(parent=_local_root(), **build)
            if not exists(join(remote, "meta.json")):  # else another node uploaded meanwhile
                _upload(local, remote)
        cache = ImageCache(local, source=remote)
    if cache.skipped and not skip_bad:
        raise DataError(
            f"cache store {cache.source} left out {len(cache.skipped)} images that fail to "
            f"decode: {name_some(cache.skipped)}; fix them, or leave them out: "
            "data.skip_bad: true in the space or trial file (raysearch data --skip-bad)"
        )
    return cache


def _manifest_paths(manifest: pd.DataFrame) -> list[str]:
    if "image_path" not in manifest.columns:
        raise DataError(
            f"manifest has no `image_path` column (columns: {name_some(list(manifest.columns), limit=8)})"
        )
    if manifest.empty:
        raise DataError("manifest is empty: there are no images to cache")
    paths = manifest["image_path"].astype(str)
    dupes = paths[paths.duplicated()].unique().tolist()
    if dupes:
        raise DataError(
            f"manifest lists {len(dupes)} image paths more than once: {name_some(dupes)}"
        )
    return paths.tolist()


def _local_root() -> str:
    root = os.environ.get("RAYSEARCH_LOCAL_CACHE") or os.path.join("~", ".cache", "raysearch")
    return os.path.abspath(os.path.expanduser(root))


def _build_local(
    *,
    parent: str,
    paths: list[str],
    key: str,
    image_size: int,
    num_workers: int | None,
    skip_bad: bool,
    progress: bool,
) -> None:
    """Build ``<parent>/<key>`` in a temporary sibling, then rename it into place."""
    n, s = len(paths), image_size
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{key}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        images_path = os.path.join(tmp, "images.u8")
        _allocate(images_path, cache_bytes(n, s))
        failures = _decode_all(
            paths, images_path, image_size=s, num_workers=num_workers, progress=progress
        )
        bad = [p for _, p, _ in failures]
        if bad and not skip_bad:
            raise DataError(
                f"{len(bad)} images fail to decode: {name_some(bad)} (first error: "
                f"{failures[0][2]}); fix them, or leave them out: "
            "data.skip_bad: true in the space or trial file (raysearch data --skip-bad)"
            )
        keep = np.ones(n, dtype=bool)
        keep[[i for i, _, _ in failures]] = False
        m = int(keep.sum())
        if m == 0:
            raise DataError(f"none of the {n} images decode, e.g. {name_some(bad)}")
        if m < n:
            _compact(images_path, keep, image_size=s)
            _progress_note(progress, f"cache {key}: left out {n - m} images that fail to decode")
        kept_paths = [p for p, k in zip(paths, keep) if k]
        pd.DataFrame({"image_path": kept_paths, "row": np.arange(m, dtype=np.int64)}).to_parquet(
            os.path.join(tmp, "index.parquet"), index=False
        )
        meta = {
            "key": key,
            "image_size": s,
            "n": m,
            "preprocess_version": PREPROCESS_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "skipped": bad,
        }
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        _commit_dir(tmp, os.path.join(parent, key))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _allocate(path: str, size: int) -> None:
    """Create ``path`` with ``size`` bytes allocated on disk. Decoders write into it through a
    memory map, and a write into a sparse file on a full disk kills the writer with SIGBUS;
    allocating first turns a full disk into one clear error before any decoding."""
    from raysearch.errors import StorageError

    with open(path, "wb") as f:
        if not hasattr(os, "posix_fallocate"):
            f.truncate(size)
            return
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise StorageError(
                    f"no space left on {os.path.dirname(os.path.dirname(path))} for the image "
                    f"cache: it needs {size / 1e6:.0f} MB"
                ) from e
            f.truncate(size)  # file systems without fallocate (EOPNOTSUPP): sparse, as before


def _commit_dir(tmp: str, final: str) -> None:
    """Rename a finished directory into place; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.isdir(final):
            raise


def _compact(images_path: str, keep: np.ndarray, *, image_size: int) -> None:
    """Move kept rows down over the left-out ones and truncate the file."""
    n, s = len(keep), image_size
    mm = np.memmap(images_path, dtype=np.uint8, mode="r+", shape=(n, s, s))
    src = np.flatnonzero(keep)
    # Ascending blocks: every destination row is <= its source, and sources of later blocks lie
    # beyond the current block's destinations, so nothing is overwritten before it is read.
    for start in range(0, len(src), 1024):
        block = src[start : start + 1024]
        mm[start : start + len(block)] = mm[block]
    mm.flush()
    del mm
    os.truncate(images_path, len(src) * s * s)


def _decode_chunk(images_path: str, n: int, image_size: int, start: int, paths: list[str]):
    """Decode ``paths`` into rows ``start...`` of the memmap; return ``[(row, path, error)]``."""
    mm = np.memmap(images_path, dtype=np.uint8, mode="r+", shape=(n, image_size, image_size))
    failures = []
    for i, p in enumerate(paths, start):
        try:
            mm[i] = preprocess_image(p, image_size=image_size)
        except Exception as e:  # noqa: BLE001 - recorded, then raised or reported by the caller
            failures.append((i, p, str(e)))
    mm.flush()
    del mm
    return failures


def _decode_all(
    paths: list[str], images_path: str, *, image_size: int, num_workers: int | None, progress: bool
) -> list[tuple[int, str, str]]:
    n = len(paths)
    if num_workers is None:  # a pool costs ~1 s to start: not worth it for a handful of images
        workers = min(os.cpu_count() or 1, math.ceil(n / 64))
    else:
        workers = min(num_workers, n)
    chunk = max(1, min(256, math.ceil(n / (workers * 4))))
    chunks = [(start, paths[start : start + chunk]) for start in range(0, n, chunk)]
    failures: list[tuple[int, str, str]] = []
    with _progress_bar(
        progress, total=n, description=f"decoding {n} images ({image_size}px)"
    ) as advance:
        if workers == 1:
            for start, part in chunks:
                failures += _decode_chunk(images_path, n, image_size, start, part)
                advance(len(part))
        else:
            # forkserver: forking a driver that runs Ray or torch threads is unsafe.
            ctx = multiprocessing.get_context("forkserver")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = {
                    pool.submit(_decode_chunk, images_path, n, image_size, start, part): len(part)
                    for start, part in chunks
                }
                for future in as_completed(futures):
                    failures += future.result()
                    advance(futures[future])
    return sorted(failures)


@contextmanager
def _progress_bar(
    enabled: bool, *, total: int, description: str
) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda k: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda k: bar.advance(task, k)


def _progress_note(enabled: bool, text: str) -> None:
    if enabled:
        from rich.console import Console

        Console(stderr=True).print(f"[yellow]{text}[/]")


# ----------------------------------------------------------------------------- remote stores


def _upload(local: str, remote: str) -> None:
    """Upload a finished store, streaming the (possibly multi-GB) image file; meta.json last."""
    for name in _FILES[:-1]:
        fs, p = get_fs(join(remote, name))
        parent, base = p.rsplit("/", 1)
        tmp = f"{parent}/.{base}.tmp-{uuid.uuid4().hex[:8]}"
        fs.makedirs(parent, exist_ok=True)
        try:
            fs.put_file(os.path.join(local, name), tmp)
            fs.mv(tmp, p)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)
    with open(os.path.join(local, "meta.json"), "rb") as f:
        atomic_write_bytes(join(remote, "meta.json"), f.read())


def _download(remote: str, *, key: str) -> str:
    """Copy a complete remote store into the node-local directory once; return its local path."""
    root = _local_root()
    final = os.path.join(root, key)
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".{key}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        for name in _FILES:
            fs, p = get_fs(join(remote, name))
            fs.get_file(p, os.path.join(tmp, name))
        _commit_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
