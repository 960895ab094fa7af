"""Train stage, the Ray side: the session, the ``TorchTrainer`` of one trial, the Tune driver that
runs it, and ``raysearch train`` (one trial, no search).

The data are read, split and cached once, on the driver (:func:`prepare_data`), before any trial
starts; each worker then runs :func:`raysearch.train.worker.train_loop_per_worker` on what is already
there. A worker group that cannot start fails its trial after ``CONTROLLER_FAILURE_LIMIT``
attempts instead of waiting for resources forever.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import pandas as pd

from raysearch.cluster import init_ray
from raysearch.config import TrialConfig
from raysearch.data.prepare import check_free_space, prepare_data, read_dataset
from raysearch.errors import RaysearchError
from raysearch.storage import join
from raysearch.train.worker import train_loop_per_worker

__all__ = ["CONTROLLER_FAILURE_LIMIT", "make_trainer", "run_single", "tune_trial_driver"]

CONTROLLER_FAILURE_LIMIT = 3  # a worker group that cannot start fails the trial instead of hanging


# ----------------------------------------------------------------------------- data preparation


# ----------------------------------------------------------------------------- Ray session


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
    from raysearch.report.tables import epochs_table

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
        from raysearch.models.factory import check_weights

        check_weights({(cfg.arch, cfg.weights)})
        manifest = read_dataset(data, console=console)
        from raysearch.train.losses import weighting_notes

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
