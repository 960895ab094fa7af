"""Benchmarks, the pipeline: the data cache and a whole trial, measured, printed, returned as
plain dicts.

``bench_data`` compares the data stage's decode-once cache with an ImageFolder-style pipeline that
decodes and resizes every PNG again in every epoch (the CPU bottleneck behind
ray-project/ray#28171 and the lung-triage report's starved GPU). ``bench_train`` measures a
trial's throughput under Ray Train against bare forward/backward steps on tensors in memory.
The search benchmark is in :mod:`raysearch.bench.search`.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from raysearch.errors import ConfigError, DataError

__all__ = ["bench_data", "bench_train", "demo_root"]

ROUNDS = 5  # alternating rounds of the two arms; the median of the paired ratios is reported


@contextmanager
def _single_thread():
    """Measure per core: one torch thread (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _PngDataset(torch.utils.data.Dataset):
    """What a torchvision ImageFolder-style Dataset does: open, convert, letterbox and resize the
    PNG on every access. It calls the cache's own ``preprocess_image`` so both pipelines deliver
    identical pixels and the comparison measures only where the work happens."""

    def __init__(self, paths: list[str], labels: np.ndarray, *, image_size: int) -> None:
        self.paths, self.labels, self.image_size = paths, labels.astype(np.float32), image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from raysearch.data.images import preprocess_image

        image = preprocess_image(self.paths[i], image_size=self.image_size)
        return torch.from_numpy(image).unsqueeze(0), self.labels[i]


def _rate(run_epoch, n: int):
    """``run_epoch(i)`` timed: images per second over one epoch of ``n`` images."""

    def measure(epoch: int) -> float:
        t0 = time.perf_counter()
        seen = run_epoch(epoch)
        elapsed = time.perf_counter() - t0
        if seen != n:
            raise AssertionError(f"benchmark epoch saw {seen} images, expected {n}")
        return n / max(elapsed, 1e-9)

    return measure


def bench_data(
    *,
    root: str | None = None,
    image_size: int = 128,
    n_images: int = 512,
    batch_size: int = 64,
    seed: int = 0,
    rounds: int = ROUNDS,
    console: Console | None = None,
) -> dict[str, Any]:
    """Images per second, per core, of per-epoch PNG decoding versus the decode-once cache.

    ``root``: a MURA-v1.1 dataset (default: a generated "small" demo dataset in a temporary
    folder). ``n_images`` images are drawn with ``seed``; the two pipelines take turns, one epoch
    each, for ``rounds`` rounds with one torch thread (:func:`raysearch.bench.paired.alternate`),
    and the median of the per-round speedups is reported with its range. Building the cache is a
    one-off and is timed separately. Returns the figures as a dict.
    """
    from raysearch.bench.paired import alternate, paired_ratio
    from raysearch.data.cache import build_cache
    from raysearch.data.loader import BatchLoader

    if n_images < 1 or batch_size < 1 or image_size < 1:
        raise ConfigError(
            f"n_images, batch_size and image_size must be >= 1, got "
            f"{n_images=}, {batch_size=}, {image_size=}"
        )
    console = console or Console()
    with tempfile.TemporaryDirectory(prefix="raysearch-bench-") as tmp:
        if root is None:
            from raysearch.data.synth import make_demo_data

            console.print("generating the 'small' demo dataset ...")
            root = make_demo_data(tmp, seed=seed, size="small")
        manifest = _sample(root, n_images=n_images, seed=seed)
        paths, labels = manifest["image_path"].tolist(), manifest["label"].to_numpy(np.float32)
        n = len(paths)

        with _single_thread():
            # --- the one-off: decode every image into the store, in this process
            t0 = time.perf_counter()
            cache = build_cache(
                manifest,
                image_size=image_size,
                cache_dir=f"{tmp}/cache",
                num_workers=1,
                progress=False,
            )
            build_seconds = time.perf_counter() - t0
            rows = cache.rows_for(paths)

            # --- naive: decode and resize every image again in every epoch
            dataset = _PngDataset(paths, labels, image_size=image_size)

            def naive_epoch(epoch: int) -> int:
                g = torch.Generator().manual_seed(seed * 1000 + epoch)
                loader = torch.utils.data.DataLoader(
                    dataset, batch_size=batch_size, shuffle=True, num_workers=0, generator=g
                )
                return sum(len(images) for images, _ in loader)

            # --- cached: training batches gathered from the memory-mapped store
            loader = BatchLoader(
                cache, rows, labels, batch_size=batch_size, shuffle=True, seed=seed
            )

            def cached_epoch(epoch: int) -> int:
                loader.set_epoch(epoch)
                return sum(len(images) for images, _, _ in loader)

            pairs = alternate(_rate(naive_epoch, n), _rate(cached_epoch, n), rounds=rounds)
            naive = statistics.median(a for a, _ in pairs)
            cached = statistics.median(b for _, b in pairs)
            speedup = paired_ratio(pairs)

        # Same pixels from both pipelines, or the comparison would mean nothing.
        first = dataset[0][0][0].numpy()
        if not np.array_equal(first, cache.images[rows[0]]):
            raise AssertionError("cached and naive pipelines disagree on the first image")

    result = {
        "n_images": n,
        "image_size": image_size,
        "batch_size": batch_size,
        "build_seconds": build_seconds,
        "build_images_per_s": n / max(build_seconds, 1e-9),
        "naive_images_per_s": naive,
        "cached_images_per_s": cached,
        "speedup": speedup.median,
        "speedup_low": speedup.low,
        "speedup_high": speedup.high,
        "rounds": rounds,
    }
    _print_table(console, result)
    return result


def _sample(root: str, *, n_images: int, seed: int):
    """``n_images`` manifest rows drawn with ``seed`` (all of them if there are fewer)."""
    from raysearch.data.mura import read_mura

    manifest = read_mura(root)
    if manifest.empty:
        raise DataError(f"no images found under {root}")
    take = min(n_images, len(manifest))
    picked = np.sort(np.random.default_rng(seed).choice(len(manifest), size=take, replace=False))
    return manifest.iloc[picked].reset_index(drop=True)


def _print_table(console: Console, r: dict[str, Any]) -> None:
    table = Table(
        title=f"data pipeline, {r['n_images']} images at {r['image_size']} px, "
        f"batch {r['batch_size']}, 1 thread",
    )
    table.add_column("pipeline")
    table.add_column("images/s", justify="right")
    table.add_column("vs naive", justify="right")
    naive = r["naive_images_per_s"]
    table.add_row("naive: decode PNG every epoch (median)", f"{naive:,.0f}", "1.0x")
    table.add_row(
        "cached: BatchLoader over the store (median)",
        f"{r['cached_images_per_s']:,.0f}",
        f"{r['speedup']:,.1f}x ({r['speedup_low']:,.0f}-{r['speedup_high']:,.0f}x)",
    )
    table.add_row(
        f"cache build (one-off, {r['build_seconds']:.2f} s)",
        f"{r['build_images_per_s']:,.0f}",
        f"{r['build_images_per_s'] / naive:,.1f}x",
    )
    console.print(table)
    verdict = "meets" if r["speedup"] >= 20 else "misses"
    console.print(
        f"cached/naive = {r['speedup']:,.1f}x per core: the median of {r['rounds']} paired rounds, "
        f"range {r['speedup_low']:,.1f}-{r['speedup_high']:,.1f}x ({verdict} the 20x target)"
    )


# ----------------------------------------------------------------------------- bench train


def demo_root(root: str | None, console) -> tuple[str, Any]:
    """``root`` or a freshly generated 'small' demo dataset (with its TemporaryDirectory)."""
    if root is not None:
        return root, None
    from raysearch.data.synth import make_demo_data

    tmp = tempfile.TemporaryDirectory(prefix="raysearch-bench-")
    console.print("generating the demo dataset (small) ...")
    make_demo_data(tmp.name, seed=0, size="small")
    return tmp.name, tmp


def bench_train(
    *,
    root: str | None = None,
    arch: str = "resnet18",
    image_size: int = 64,
    batch_size: int = 32,
    threads: int | None = None,
    rounds: int = 3,
    gpus: float = 0.0,
    console: Console | None = None,
) -> dict[str, Any]:
    """End-to-end trial throughput (Ray Train worker: cache, augmentation, forward, backward, step)
    against pure forward/backward/step on tensors already in memory, same arch/size/batch/threads.

    The arms alternate (:func:`raysearch.bench.paired.alternate`): each round runs a burst of
    pure steps and one more epoch of the trial (the same Train run, resumed from its checkpoint,
    so each round adds one epoch). The result is the median of the per-round ratios trial / pure
    with their range; a median above 1 by more than the noise (a trial faster than the model it
    wraps) is flagged (``flag``) and ``ratio`` is None.
    """
    import statistics

    import torch
    import torch.nn.functional as F

    from raysearch.bench.paired import alternate, paired_ratio
    from raysearch.config import DataConfig, TrialConfig
    from raysearch.data.prepare import prepare_data, read_dataset
    from raysearch.models.factory import create_model
    from raysearch.train.trainer import make_trainer

    console = console or Console()
    threads = threads or (os.cpu_count() or 1)
    data_root, tmp = demo_root(root, console)
    work = tempfile.TemporaryDirectory(prefix="raysearch-bench-train-")
    epochs: list[dict[str, float]] = []
    try:
        exp_dir = os.path.join(work.name, "bench")
        cache_dir = os.path.join(work.name, "cache")
        frame, task = read_dataset(DataConfig(root=data_root, val_fraction=0.15, seed=0))
        manifest = prepare_data(frame, experiment_dir=exp_dir, cache_dir=cache_dir,
                                image_sizes=[image_size], progress=False)

        # 1. Pure compute: forward/backward/step on a batch already in memory, ready to use.
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = create_model(arch, weights="none", dropout=0.0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.randn(batch_size, 3, image_size, image_size)
        y = (torch.rand(batch_size) > 0.5).float()
        model.train()

        def step():
            loss = F.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(3):
            step()
        n_steps = max(10, int(1500 / batch_size))

        def pure(_: int) -> float:
            t0 = time.perf_counter()
            for _ in range(n_steps):
                step()
            return n_steps * batch_size / (time.perf_counter() - t0)

        # 2. The trial itself, under Ray Train, with the same thread count: one epoch per round.
        from raysearch.cluster import init_ray

        init_ray()

        def trial(i: int) -> float:
            cfg = TrialConfig(
                arch=arch, weights="none", image_size=image_size, batch_size=batch_size,
                max_epochs=i + 1, augment="mura", class_weighting="mura", lr=1e-3,
                early_stop_patience=rounds + 1,
            )
            trainer = make_trainer(
                {"trial": cfg.to_dict(), "task": task.to_dict(), "manifest": manifest,
                 "cache_dir": cache_dir, "torch_threads": threads},
                run_name="bench-train", storage=exp_dir, workers=1, gpus_per_worker=gpus,
                cpus_per_worker=1.0,
            )
            last = trainer.fit().metrics_dataframe.iloc[-1]
            epochs.append({k: float(last[k]) for k in (
                "train_images_per_s", "val_time_s", "checkpoint_write_s", "epoch_time_s")})
            return epochs[-1]["train_images_per_s"]

        pairs = alternate(pure, trial, rounds=rounds)
    finally:
        work.cleanup()
        if tmp is not None:
            tmp.cleanup()

    ratio = paired_ratio(pairs, ceiling=1.0,
                         impossible="a trial cannot be faster than the pure model it wraps")
    figures = {
        "pure_images_per_s": statistics.median(a for a, _ in pairs),
        "trial_images_per_s": statistics.median(b for _, b in pairs),
        "ratio": ratio.value, "ratio_median": ratio.median, "ratio_low": ratio.low,
        "ratio_high": ratio.high, "flag": ratio.flag, "rounds": rounds,
        "val_time_s": statistics.median(e["val_time_s"] for e in epochs),
        "checkpoint_write_s": statistics.median(e["checkpoint_write_s"] for e in epochs),
        "epoch_time_s": statistics.median(e["epoch_time_s"] for e in epochs),
        "threads": threads,
    }
    table = Table(
        title=f"bench train: {arch}, {image_size}px, batch {batch_size}, {threads} thread(s), "
        f"{os.cpu_count()} cores, {rounds} alternating rounds",
        title_justify="left",
    )
    table.add_column("measurement (median over rounds)")
    table.add_column("value", justify="right")
    table.add_row("pure forward/backward/step (images/s)", f"{figures['pure_images_per_s']:.1f}")
    table.add_row("trial end to end under Ray Train (images/s)",
                  f"{figures['trial_images_per_s']:.1f}")
    table.add_row("ratio trial / pure, paired by round (target >= 0.9)",
                  "flagged" if ratio.flag else
                  f"{ratio.median:.2f} ({ratio.low:.2f}-{ratio.high:.2f})")
    table.add_row("per-epoch validation (s)", f"{figures['val_time_s']:.2f}")
    table.add_row("per-epoch checkpoint write (s)", f"{figures['checkpoint_write_s']:.2f}")
    table.add_row("per-epoch training (s)", f"{figures['epoch_time_s']:.2f}")
    console.print(table)
    if ratio.flag:
        console.print(f"[yellow]bench train: {ratio.flag}[/]")
    return figures
