"""Train stage, the Ray side: the session, the ``TorchTrainer`` of one trial, the Tune driver that
runs it, and ``raysearch train`` (one trial, no search).

The data are read, split and cached once, on the driver (:func:`prepare_data`), before any trial
starts; each worker then runs :func:`raysearch.train.train_loop_per_worker` on what is already
there. A worker group that cannot start fails its trial after ``CONTROLLER_FAILURE_LIMIT``
attempts instead of waiting for resources forever.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from typing import Any

import pandas as pd

from raysearch.config import TrialConfig
from raysearch.errors import RaysearchError
from raysearch.storage import atomic_write_parquet, join
from raysearch.train import train_loop_per_worker

__all__ = [
    "init_ray",
    "local_ray_args",
    "make_trainer",
    "prepare_data",
    "run_single",
    "tune_trial_driver",
]

CONTROLLER_FAILURE_LIMIT = 3  # a worker group that cannot start fails the trial instead of hanging


# ----------------------------------------------------------------------------- data preparation


def read_dataset(data, *, console=None) -> pd.DataFrame:
    """Read and split the dataset of a :class:`~raysearch.config.DataConfig` (before Ray starts).

    Every problem with the data raises one :class:`~raysearch.errors.DataError` line, unless
    ``data.skip_bad`` leaves the bad images out; ``console`` is told how many.
    """
    from raysearch.data import read_mura

    manifest = read_mura(data.root, val_fraction=data.val_fraction, seed=data.seed,
                         skip_bad=data.skip_bad)
    skipped = manifest.attrs.get("skipped")
    if console is not None and skipped is not None and len(skipped):
        console.print(f"[yellow]left out {len(skipped)} bad images (--skip-bad)[/]")
    return manifest


def prepare_data(
    *,
    experiment_dir: str,
    cache_dir: str,
    image_sizes: list[int],
    manifest: pd.DataFrame | None = None,
    root: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
    console=None,
) -> str:
    """Save the manifest into the experiment and build the caches. Returns the manifest URI.

    ``manifest`` is the one :func:`read_dataset` returned; without it the dataset at ``root`` is
    read here. Runs once on the driver so that trials only open what is already there.
    """
    from raysearch.cache import build_cache
    from raysearch.config import DataConfig

    if manifest is None:
        data = DataConfig(root=root or "", val_fraction=val_fraction, seed=seed, skip_bad=skip_bad)
        manifest = read_dataset(data, console=console)
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
    archs: set[str],
    num_trials: int,
    console=None,
) -> None:
    """Refuse (:class:`~raysearch.errors.StorageError`) a run whose caches and checkpoints cannot
    fit the local disks they go to; warn when they would fill more than 80 % of the free space.

    Estimates: a cache store holds ``n_images * S * S`` bytes per image size S not built yet
    (``raysearch.cache``); a trial keeps two checkpoints (best and latest), each its weights and
    Adam's two moment buffers, ``12 * params + 4 * buffers`` bytes (``models.checkpoint_bytes``),
    for the largest architecture searched. Buckets (``gs://``) are not checked.
    """
    from raysearch.cache import cache_bytes, cache_key
    from raysearch.errors import StorageError
    from raysearch.models import checkpoint_bytes
    from raysearch.storage import exists

    paths = manifest["image_path"].astype(str).tolist()
    cache_need = sum(
        cache_bytes(len(paths), s) for s in sorted(set(image_sizes))
        if not exists(join(cache_dir, cache_key(paths, image_size=s), "meta.json"))
    )
    ckpt_need = 2 * num_trials * max(checkpoint_bytes(a) for a in archs) if archs else 0
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


# ----------------------------------------------------------------------------- Ray session


def init_ray(*, address: str | None = None, verbose: bool = False) -> None:
    """Connect to a running cluster (``--address`` or RAY_ADDRESS) or start a local instance."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    kwargs: dict[str, Any] = {
        "logging_level": logging.INFO if verbose else logging.ERROR,
        "log_to_driver": verbose,
        "configure_logging": True,
    }
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(local_ray_args())
    # Workers import raysearch from the same interpreter/environment; the package must be
    # installed on every node (cluster.yaml does this).
    ray.init(**kwargs)
    if not verbose:
        from raysearch.logs import quiet_libraries

        quiet_libraries()  # ray.init put its terminal handler back: failed trials go to the log


def local_ray_args(env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """``ray.init`` arguments for a local instance whose workers always find its State API.

    Ray Train's PlacementGroupCleaner, a worker, asks the State API every second whether its
    trial's controller is alive, and removes the trial's placement group once it is not (ASHA
    stopped the trial). Without an address the State API client looks for *the* Ray instance on
    the machine and raises "Found multiple active Ray instances" when there are two (two
    searches at once, or a test's search next to the test session's). The cleaner's thread dies
    of it, the next stopped trial's CPUs are never freed, and the search hangs: seen here in
    ``raysearch bench search``. A fixed dashboard port, and its URL in every worker's
    ``RAY_API_SERVER_ADDRESS`` (which the client reads first), leave nothing to guess.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**(env_vars or {}), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    return {"dashboard_host": "127.0.0.1", "dashboard_port": port,
            "runtime_env": {"env_vars": env}}


# ----------------------------------------------------------------------------- Ray Train plumbing


def make_trainer(
    loop_config: dict[str, Any],
    *,
    run_name: str,
    storage: str,
    workers: int,
    gpus_per_worker: float,
    cpus_per_worker: float,
    max_failures: int = 0,
    callbacks: list | None = None,
):
    """A TorchTrainer for one trial. Best-by-val_loss and latest checkpoints are kept."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysearch.storage import ray_storage_args

    resources = {"CPU": cpus_per_worker}
    if gpus_per_worker:
        resources["GPU"] = gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=bool(gpus_per_worker), resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            **ray_storage_args(storage),
            # num_to_keep=1 with a score keeps the best checkpoint; Ray always keeps the latest too.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
            ),
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT
            ),
            callbacks=callbacks or [],
        ),
    )


def tune_trial_driver(config: dict[str, Any], *, run: dict[str, Any]) -> None:
    """The Tune function trainable of one trial: builds and fits the trial's TorchTrainer.

    ``config`` holds the sampled parameters; ``run`` the constants of the experiment.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    sampled = {k: v for k, v in config.items() if k in run["space_names"]}
    trial = {**run["trial"], **sampled, "max_epochs": run["max_epochs"]}
    loop_config = {
        "trial": TrialConfig.from_dict(trial).to_dict(),
        "manifest": run["manifest"],
        "cache_dir": run["cache_dir"],
        "torch_threads": run["torch_threads"],
    }
    trainer = make_trainer(
        loop_config,
        run_name=f"train-{trial_id}",
        storage=run["experiment_dir"],
        workers=run["workers"],
        gpus_per_worker=run["gpus_per_worker"],
        cpus_per_worker=run["cpus_per_worker"],
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def run_single(
    config_path: str,
    *,
    data_root: str | None = None,
    storage: str | None = None,
    name: str | None = None,
    fresh: bool = False,
    address: str | None = None,
    verbose: bool = False,
    console=None,
) -> pd.DataFrame:
    """``raysearch train CONFIG.yaml``: one trial, no search, through the same Ray Train path.

    Running it again on the same name continues from the latest checkpoint (``fresh`` starts over:
    the old experiment is deleted only after every other check has passed). Returns the reported
    epochs. Raises :class:`~raysearch.errors.ExperimentLockedError` when another run holds the
    experiment, and :class:`~raysearch.errors.ConfigError` for an unsafe name.
    """
    import dataclasses

    from rich.console import Console

    from raysearch.config import load_trial_config
    from raysearch.experiment import (
        ExperimentLock,
        check_name,
        check_writable,
        is_experiment,
        read_info,
        remove_experiment,
        update_info,
    )
    from raysearch.report import epochs_table

    console = console or Console(stderr=True)
    cfg, rest = load_trial_config(config_path)
    data = rest["data"]
    if data_root:
        data = dataclasses.replace(data, root=os.path.abspath(data_root) if "://" not in data_root else data_root)
    storage = storage or rest["storage"]
    name = check_name(name if name is not None else rest["name"])
    exp_dir = join(storage, name)
    cache_dir = data.cache_dir or join(storage, "cache")
    with ExperimentLock(exp_dir, command="train"):
        if fresh:
            remove_experiment(exp_dir, storage=storage, dry_run=True)
        elif is_experiment(exp_dir) and read_info(exp_dir).get("kind", "train") != "train":
            raise RaysearchError(
                f"{exp_dir} holds a `raysearch {read_info(exp_dir)['kind']}` experiment; use "
                "another --name, or --fresh to replace it"
            )
        else:
            check_writable(exp_dir)
        from raysearch.models import check_weights

        check_weights({(cfg.arch, cfg.weights)})
        manifest = read_dataset(data, console=console)
        from raysearch.weighting import weighting_notes

        train = manifest[manifest["split"] == "train"]
        for note in weighting_notes(train, scheme=cfg.class_weighting, fp_bias=cfg.fp_bias):
            console.print(f"[yellow]{note}[/]")
        check_free_space(manifest=manifest, image_sizes=[cfg.image_size], cache_dir=cache_dir,
                         experiment_dir=exp_dir, archs={cfg.arch}, num_trials=1, console=console)
        if fresh:
            remove_experiment(exp_dir, storage=storage)
        update_info(exp_dir, kind="train", name=name, state="running",
                    manifest="manifest.parquet", cache_dir=cache_dir,
                    data={"root": data.root, "val_fraction": data.val_fraction, "seed": data.seed})
        manifest_uri = prepare_data(manifest=manifest, experiment_dir=exp_dir, cache_dir=cache_dir,
                                    image_sizes=[cfg.image_size])
        init_ray(address=address, verbose=verbose)
        import ray

        res = rest["resources"]
        workers = res.workers_per_trial
        total_cpu = float(ray.cluster_resources().get("CPU", 1))
        gpus = res.gpus_per_worker if res.gpus_per_worker is not None else (
            1.0 if ray.cluster_resources().get("GPU", 0) else 0.0)
        cpus = res.cpus_per_worker or max(0.01, math.floor(total_cpu / workers * 100) / 100)
        trainer = make_trainer(
            {"trial": cfg.to_dict(), "manifest": manifest_uri, "cache_dir": cache_dir,
             "torch_threads": max(1, round(cpus))},
            run_name="train", storage=exp_dir, workers=workers, gpus_per_worker=gpus,
            cpus_per_worker=cpus, max_failures=res.max_failures,
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RaysearchError(f"trial {name} reported no checkpoint")
        with result.checkpoint.as_directory() as d, open(os.path.join(d, "history.json")) as f:
            epochs = pd.DataFrame(json.load(f))
        update_info(exp_dir, state="finished")
        console.print(epochs_table(epochs, title=f"{name}: {cfg.arch} @ {cfg.image_size}px"))
        best = result.get_best_checkpoint("val_loss", "min")
        if best is not None:
            console.print(f"best checkpoint: {best.path}")
        return epochs
