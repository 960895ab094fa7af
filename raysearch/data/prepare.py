"""Data stage, what the driver does once before any trial starts: read and split the dataset,
check that its caches and the trials' checkpoints fit the disks, save the manifest into the
experiment, build the decode-once caches. Never imports ray.
"""

from __future__ import annotations

import os

import pandas as pd

from raysearch.data.dataset import Task
from raysearch.storage import atomic_write_parquet, join

__all__ = ["check_free_space", "free_bytes", "prepare_data", "read_dataset"]


def read_dataset(data, *, console=None) -> tuple[pd.DataFrame, Task]:
    """Read and split the dataset of a :class:`~raysearch.config.DataConfig` (before Ray starts):
    the manifest (one row per image, ``split`` train/val/test) and the task it poses.

    ``data.format`` picks the reader (``auto``: detected, :mod:`raysearch.data.formats`): MURA's
    (:mod:`raysearch.data.mura`), or chexpert, nih or csv (:mod:`raysearch.data.reader`).
    Every problem with the data raises one :class:`~raysearch.errors.DataError` line, unless
    ``data.skip_bad`` leaves the bad images out; ``console`` is told how many.
    """
    from raysearch.data.formats import read_any, resolve_format
    from raysearch.data.mura import MURA_TASK, read_mura, skipped_counts

    fmt = resolve_format(data)
    if fmt != "mura":
        manifest, task = read_any(data)
    else:
        _check_mura_options(data)
        manifest = read_mura(data.root, val_fraction=data.val_fraction, seed=data.seed,
                             skip_bad=data.skip_bad)
        task = MURA_TASK
    if console is not None and (counts := skipped_counts(manifest)):
        console.print(f"[yellow]left out {counts} (--skip-bad)[/]")
    return manifest, task


def _check_mura_options(data) -> None:
    """MURA has one label and its own split: options for the other formats are refused, not
    silently ignored."""
    from raysearch.errors import ConfigError

    if extra := data.reader_options():
        raise ConfigError(f"data.{extra[0]} does not apply to the mura format (one label, "
                          "official valid as test)")


def prepare_data(
    manifest: pd.DataFrame,
    *,
    experiment_dir: str,
    cache_dir: str,
    image_sizes: list[int],
    progress: bool = True,
) -> str:
    """Save ``manifest`` into the experiment and build its caches (one per image size). Returns
    the manifest URI. Runs once on the driver, so that trials only open what is already there."""
    from raysearch.data.cache import build_cache

    uri = join(experiment_dir, "manifest.parquet")
    atomic_write_parquet(manifest, uri)
    for size in sorted(set(image_sizes)):
        build_cache(manifest, image_size=size, cache_dir=cache_dir, progress=progress)
    return uri


def free_bytes(uri: str) -> int | None:
    """Free bytes on the local file system that holds (or would hold) ``uri``; None for URLs."""
    import shutil

    from raysearch.storage import is_url

    if is_url(uri):
        return None
    path = os.path.abspath(os.path.expanduser(uri))
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return shutil.disk_usage(path).free

def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"

def check_free_space(
    *,
    manifest: pd.DataFrame,
    image_sizes: list[int],
    cache_dir: str,
    experiment_dir: str,
    checkpoint_bytes: int,
    num_trials: int,
    console=None,
) -> None:
    """Refuse (:class:`~raysearch.errors.StorageError`) a run whose caches and checkpoints cannot
    fit the local disks they go to; warn when they would fill more than 80 % of the free space.

    Estimates: a cache store holds ``n_images * S * S`` bytes per image size S not built yet
    (``raysearch.data.cache``); a trial keeps two checkpoints (best and latest), each its weights and
    Adam's two moment buffers: ``checkpoint_bytes`` (``raysearch.models.checkpoint_bytes`` of the
    largest architecture searched). Buckets (``gs://``) are not checked.
    """
    from raysearch.data.cache import cache_bytes, cache_key
    from raysearch.errors import StorageError
    from raysearch.storage import exists

    paths = manifest["image_path"].astype(str).tolist()
    cache_need = sum(
        cache_bytes(len(paths), s) for s in sorted(set(image_sizes))
        if not exists(join(cache_dir, cache_key(paths, image_size=s), "meta.json"))
    )
    ckpt_need = 2 * num_trials * checkpoint_bytes
    needs: dict[int, list[tuple[str, float, str]]] = {}
    for what, n, where in (("the image caches", cache_need, cache_dir),
                           (f"checkpoints of {num_trials} trial(s)", ckpt_need, experiment_dir)):
        free = free_bytes(where)
        if free is None or n == 0:
            continue
        dev = os.stat(_existing(where)).st_dev
        needs.setdefault(dev, []).append((what, n, where))
        total = sum(x[1] for x in needs[dev])
        detail = " and ".join(f"{w} need about {_gb(m)} ({p})" for w, m, p in needs[dev])
        if total > free:
            raise StorageError(
                f"not enough space: {detail}, but only {_gb(free)} is free there; free some "
                "space or choose another storage"
            )
        if total > 0.8 * free and console is not None:
            console.print(f"[yellow]{detail}: {_gb(free)} free; the disk will be nearly full[/]")

def _existing(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path
