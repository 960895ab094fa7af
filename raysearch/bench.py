"""Benchmarks (tooling around the pipeline stages): measured, printed, returned as plain dicts.

``bench_data`` compares the data stage's decode-once cache with an ImageFolder-style pipeline that
decodes and resizes every PNG again in every epoch (the CPU bottleneck behind
ray-project/ray#28171 and the lung-triage report's starved GPU).
"""

from __future__ import annotations

import dataclasses
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

from raysearch.errors import ConfigError, DataError, ExperimentExistsError
from raysearch.storage import join, read_parquet

__all__ = ["bench_data"]

_EPOCHS = 3  # measurements per pipeline; the median is reported


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
        from raysearch.cache import preprocess_image

        image = preprocess_image(self.paths[i], image_size=self.image_size)
        return torch.from_numpy(image).unsqueeze(0), self.labels[i]


def _images_per_second(run_epoch, n: int, epochs: int) -> float:
    rates = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        seen = run_epoch(epoch)
        elapsed = time.perf_counter() - t0
        if seen != n:
            raise AssertionError(f"benchmark epoch saw {seen} images, expected {n}")
        rates.append(n / max(elapsed, 1e-9))
    return statistics.median(rates)


def bench_data(
    *,
    root: str | None = None,
    image_size: int = 128,
    n_images: int = 512,
    batch_size: int = 64,
    seed: int = 0,
    console: Console | None = None,
) -> dict[str, Any]:
    """Images per second, per core, of per-epoch PNG decoding versus the decode-once cache.

    ``root``: a MURA-v1.1 dataset (default: a generated "small" demo dataset in a temporary
    folder). ``n_images`` images are drawn with ``seed``; each pipeline runs a few epochs over
    them with one torch thread and the median is reported. Building the cache is a one-off and is
    timed separately. Returns the figures as a dict.
    """
    from raysearch.cache import build_cache
    from raysearch.loader import BatchLoader

    if n_images < 1 or batch_size < 1 or image_size < 1:
        raise ConfigError(
            f"n_images, batch_size and image_size must be >= 1, got "
            f"{n_images=}, {batch_size=}, {image_size=}"
        )
    console = console or Console()
    with tempfile.TemporaryDirectory(prefix="raysearch-bench-") as tmp:
        if root is None:
            from raysearch.synth import make_demo_data

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

            naive = _images_per_second(naive_epoch, n, _EPOCHS)
            cached = _images_per_second(cached_epoch, n, _EPOCHS)

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
        "speedup": cached / naive,
    }
    _print_table(console, result)
    return result


def _sample(root: str, *, n_images: int, seed: int):
    """``n_images`` manifest rows drawn with ``seed`` (all of them if there are fewer)."""
    from raysearch.data import read_mura

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
    table.add_row("naive: decode PNG every epoch", f"{naive:,.0f}", "1.0x")
    table.add_row(
        "cached: BatchLoader over the store",
        f"{r['cached_images_per_s']:,.0f}",
        f"{r['speedup']:,.1f}x",
    )
    table.add_row(
        f"cache build (one-off, {r['build_seconds']:.2f} s)",
        f"{r['build_images_per_s']:,.0f}",
        f"{r['build_images_per_s'] / naive:,.1f}x",
    )
    console.print(table)
    verdict = "meets" if r["speedup"] >= 20 else "misses"
    console.print(f"cached/naive = {r['speedup']:,.1f}x per core ({verdict} the 20x target)")


# ----------------------------------------------------------------------------- bench train


def _demo_root(root: str | None, console) -> tuple[str, Any]:
    """``root`` or a freshly generated 'small' demo dataset (with its TemporaryDirectory)."""
    if root is not None:
        return root, None
    from raysearch.synth import make_demo_data

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
    epochs: int = 2,
    console: Console | None = None,
) -> dict[str, float]:
    """End-to-end trial throughput (Ray Train worker: cache, augmentation, forward, backward, step)
    against pure forward/backward/step on tensors already in memory, same arch/size/batch/threads.
    """
    import torch
    import torch.nn.functional as F

    from raysearch.config import TrialConfig
    from raysearch.launch import make_trainer, prepare_data
    from raysearch.models import create_model

    console = console or Console()
    threads = threads or (os.cpu_count() or 1)
    data_root, tmp = _demo_root(root, console)
    work = tempfile.TemporaryDirectory(prefix="raysearch-bench-train-")
    try:
        exp_dir = os.path.join(work.name, "bench")
        cache_dir = os.path.join(work.name, "cache")
        manifest = prepare_data(
            root=data_root, val_fraction=0.15, seed=0, skip_bad=False, experiment_dir=exp_dir,
            cache_dir=cache_dir, image_sizes=[image_size], progress=False,
        )
        cfg = TrialConfig(
            arch=arch, weights="none", image_size=image_size, batch_size=batch_size,
            max_epochs=epochs, augment="mura", class_weighting="mura", lr=1e-3,
            early_stop_patience=epochs + 1,
        )

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
        t0 = time.perf_counter()
        for _ in range(n_steps):
            step()
        pure = n_steps * batch_size / (time.perf_counter() - t0)


        # 2. The trial itself, under Ray Train, with the same thread count.
        from raysearch.launch import init_ray

        init_ray()
        trainer = make_trainer(
            {"trial": cfg.to_dict(), "manifest": manifest, "cache_dir": cache_dir,
             "torch_threads": threads},
            run_name="bench-train", storage=exp_dir, workers=1, gpus_per_worker=0.0,
            cpus_per_worker=1.0,
        )
        result = trainer.fit()
        df = result.metrics_dataframe
        last = df.iloc[-1]
        e2e = float(df["train_images_per_s"].max())
    finally:
        work.cleanup()
        if tmp is not None:
            tmp.cleanup()

    figures = {
        "pure_images_per_s": pure,
        "trial_images_per_s": e2e,
        "ratio": e2e / pure,
        "val_time_s": float(last["val_time_s"]),
        "checkpoint_write_s": float(last["checkpoint_write_s"]),
        "epoch_time_s": float(last["epoch_time_s"]),
        "threads": threads,
    }
    table = Table(
        title=f"bench train: {arch}, {image_size}px, batch {batch_size}, {threads} thread(s), "
        f"{os.cpu_count()} cores",
        title_justify="left",
    )
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_row("pure forward/backward/step (images/s)", f"{pure:.1f}")
    table.add_row("trial end to end under Ray Train (images/s)", f"{e2e:.1f}")
    table.add_row("ratio trial / pure (target >= 0.9)", f"{e2e / pure:.2f}")
    table.add_row("per-epoch validation (s)", f"{figures['val_time_s']:.2f}")
    table.add_row("per-epoch checkpoint write (s)", f"{figures['checkpoint_write_s']:.2f}")
    table.add_row("per-epoch training (s)", f"{figures['epoch_time_s']:.2f}")
    console.print(table)
    return figures


# ----------------------------------------------------------------------------- bench search


def _epochs_to_reach(epochs, target: float) -> int | None:
    """Epochs consumed (in reporting order) until some trial's val_loss <= target."""
    order = epochs.sort_values("reported_at")
    hits = (order["val_loss"].to_numpy() <= target + 1e-12).nonzero()[0]
    return int(hits[0]) + 1 if len(hits) else None


DEMO_SPACE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "search_spaces", "demo.yaml")
# The rung structure of the real search (search_spaces/mura.yaml: ASHA 30/3/3, rungs at 3, 9 and
# 27 epochs), not the demo's quick 8/3/2: ASHA's saving grows with max_epochs / grace_period,
# and the comparison should show what a real search gets.
BENCH_SCHEDULER = {"max_epochs": 27, "grace_period": 3, "reduction_factor": 3.0}
BENCH_TRIALS = 24


def bench_search(
    *,
    root: str | None = None,
    space: str | None = None,
    num_samples: int = BENCH_TRIALS,
    max_epochs: int = BENCH_SCHEDULER["max_epochs"],
    grace_period: int = BENCH_SCHEDULER["grace_period"],
    reduction_factor: float = BENCH_SCHEDULER["reduction_factor"],
    seeds: tuple[int, ...] = (0,),
    storage: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """ASHA + TPE against FIFO + random search on the demo data: same space, trial count, epoch
    limit and seed.

    For every search seed both searches run on one Ray instance, one after the other. The
    figure of merit is the number of epochs ASHA + TPE consumed (all trials, in the order they
    were reported) until some trial's val_loss was at least as low as the best val_loss FIFO +
    random reached with all of its epochs, as a fraction of FIFO's epochs. ``points_to_evaluate``
    is dropped: random search does not get the hand-picked start either, and trial-level early
    stopping is off in both searches (see :func:`_bench_base`). ``storage`` keeps the
    experiments (``<storage>/fifo-random-seed<S>``, ``asha-tpe-seed<S>``; by default they go to a
    temporary folder), and running the bench again with the same ``storage`` continues them the
    way ``raysearch tune`` resumes: finished searches are read back, not re-run, so a multi-hour
    comparison survives a killed driver. The wall times cover only the invocation that printed
    them.
    """
    console = console or Console()
    space = space or DEMO_SPACE
    data_root, tmp = _demo_root(root, console)
    work = tempfile.TemporaryDirectory(prefix="raysearch-bench-search-")
    out = storage or work.name
    rows: list[dict[str, Any]] = []
    try:
        base = _bench_base(space, data_root=data_root, out=out, num_samples=num_samples,
                           max_epochs=max_epochs, grace_period=grace_period,
                           reduction_factor=reduction_factor)
        for seed in seeds:
            runs = {label: _measure_search(spec, console=console)
                    for label, spec in _search_arms(base, seed).items()}
            fifo, asha = runs["fifo+random"], runs["asha+tpe"]
            needed = _epochs_to_reach(asha.pop("epoch_frame"), fifo["best_val_loss"])
            fifo.pop("epoch_frame")
            rows.append({
                "seed": seed, "fifo": fifo, "asha": asha, "epochs_needed": needed,
                # Not reached counts as worse than any fraction, so the median stays honest.
                "fraction": needed / fifo["epochs"] if needed is not None else float("inf"),
            })
            console.print(_seed_line(rows[-1]))  # a seed takes hours on a CPU: say it now
    finally:
        work.cleanup()
        if tmp is not None:
            tmp.cleanup()
    result = {
        "num_samples": base.search.num_samples,
        "scheduler": dataclasses.asdict(base.scheduler),
        "seeds": rows,
        "median_fraction": float(np.median([r["fraction"] for r in rows])),
        "reached": sum(r["epochs_needed"] is not None for r in rows),
    }
    _print_search(console, result)
    return result


def _bench_base(space: str, *, data_root: str, out: str, num_samples: int, max_epochs: int,
                grace_period: int, reduction_factor: float):
    """The search space both searches share: the file's, with the bench's rungs, no
    ``points_to_evaluate``, the decode-once cache under ``out`` and no trial-level early stopping.

    Patience is off so that FIFO means "every trial to the end" and the scheduler is the only
    thing that stops trials. With it (demo space, patience 4 of 27 epochs) every FIFO trial ended
    before 27 epochs and every trial ASHA promoted past 9 epochs ended at 13, on the noise of
    single epochs and before its cosine schedule annealed: the comparison measured patience as
    much as the scheduler.
    """
    from raysearch.space import load_search_space

    base = load_search_space(space, data_root=data_root, storage=out, num_samples=num_samples)
    return dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, cache_dir=join(out, "cache")),
        search=dataclasses.replace(base.search, points_to_evaluate=()),
        scheduler=dataclasses.replace(  # validates the bounds, as the file would
            base.scheduler, max_epochs=max_epochs, grace_period=grace_period,
            reduction_factor=reduction_factor,
        ),
        trial={**base.trial, "early_stop_patience": max_epochs + 1},
        space=tuple(p for p in base.space if p.name != "early_stop_patience"),
    )


def _search_arms(base, seed: int) -> dict[str, Any]:
    """The two searches of one seed (from :func:`_bench_base`); they differ only in searcher and
    scheduler."""
    return {
        label: dataclasses.replace(
            base,
            name=f"{label.replace('+', '-')}-seed{seed}",
            search=dataclasses.replace(base.search, algorithm=algorithm, seed=seed),
            scheduler=dataclasses.replace(base.scheduler, kind=kind),
        )
        for label, algorithm, kind in (("fifo+random", "random", "fifo"),
                                       ("asha+tpe", "tpe", "asha"))
    }


def _measure_search(spec, *, console) -> dict[str, Any]:
    """Run one search; its epochs, best val_loss, wall time and Tune/Train overhead per trial."""
    from raysearch.tune import run_search

    t0 = time.perf_counter()
    try:
        exp = run_search(spec, console=console)  # an existing experiment of this spec resumes
    except ExperimentExistsError as e:  # tune's hint names tune's flags, which bench lacks
        raise ConfigError(
            f"bench search: {e.experiment_dir} holds a {spec.name!r} search with other settings "
            "(space, trials, rungs); delete it or pass another --storage"
        ) from None
    wall = time.perf_counter() - t0
    trials = read_parquet(join(exp, "trials.parquet"))
    epochs = read_parquet(join(exp, "epochs.parquet"))
    # Overhead: what a trial's wall time holds beyond its training and validation loops
    # (worker-group start, model build, checkpoint upload, Tune bookkeeping).
    in_loop = epochs.groupby("trial_id")[["epoch_time_s", "val_time_s"]].sum().sum(axis=1)
    overhead = (trials.set_index("trial_id")["wall_time_s"] - in_loop).dropna()
    return {
        "epochs": len(epochs),
        "best_val_loss": float(epochs["val_loss"].min()),
        "trials_stopped_early": int(trials["status"].isin(["pruned", "early_stopped"]).sum()),
        "trials_at_max_epochs": int((trials["status"] == "completed").sum()),
        "wall_s": wall,
        "overhead_per_trial_s": float(overhead.mean()) if len(overhead) else float("nan"),
        "epoch_frame": epochs,
    }


def _seed_line(row: dict[str, Any]) -> str:
    fifo, asha = row["fifo"], row["asha"]
    if row["epochs_needed"] is None:
        reach = (f"did not reach it (best {asha['best_val_loss']:.4f} with all of its "
                 f"{asha['epochs']} epochs)")
    else:
        reach = (f"reached it after {row['epochs_needed']} epochs = {row['fraction']:.2f} of "
                 f"FIFO's ({asha['epochs']} in all)")
    return (f"bench search, seed {row['seed']}: FIFO+random best val_loss "
            f"{fifo['best_val_loss']:.4f} with {fifo['epochs']} epochs; ASHA+TPE {reach}")


def _print_search(console: Console, r: dict[str, Any]) -> None:
    sch = r["scheduler"]
    table = Table(
        title=f"bench search: {r['num_samples']} trials per search, max {sch['max_epochs']} epochs,"
        f" ASHA grace {sch['grace_period']} / reduction {sch['reduction_factor']:g}, "
        f"{os.cpu_count()} cores",
        title_justify="left",
    )
    for col in ("seed", "search", "epochs", "best val_loss", "to max / stopped", "wall (s)",
                "overhead/trial (s)", "ASHA+TPE epochs to FIFO's best"):
        table.add_column(col, justify="left" if col == "search" else "right")
    for row in r["seeds"]:
        for label, run in (("fifo+random", row["fifo"]), ("asha+tpe", row["asha"])):
            reach = ""
            if label == "asha+tpe":
                reach = ("not reached" if row["epochs_needed"] is None else
                         f"{row['epochs_needed']} = {row['fraction']:.2f} of FIFO's")
            table.add_row(
                str(row["seed"]), label, str(run["epochs"]), f"{run['best_val_loss']:.4f}",
                f"{run['trials_at_max_epochs']} / {run['trials_stopped_early']}",
                f"{run['wall_s']:.0f}", f"{run['overhead_per_trial_s']:.1f}", reach,
            )
    console.print(table)
    n = len(r["seeds"])
    verdict = "meets" if r["reached"] == n and r["median_fraction"] <= 1 / 3 else "misses"
    console.print(
        f"ASHA+TPE reached FIFO+random's best val_loss in {r['reached']} of {n} seed(s); median "
        f"fraction of FIFO's epochs {r['median_fraction']:.2f} ({verdict} the <= 1/3 target)"
    )
