"""Train stage, the Ray side: the ``TorchTrainer`` of one trial, the Tune driver that runs it, and
``raysearch train`` (one trial, no search).

The data are read, split and cached once, on the driver
(:func:`~raysearch.data.prepare.prepare_data`), before any trial starts; each worker then runs
:func:`raysearch.train.worker.train_loop_per_worker` on what is already there. A worker group that cannot start fails its trial after ``CONTROLLER_FAILURE_LIMIT``
attempts instead of waiting for resources forever.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, TypedDict

import pandas as pd

from raysearch.cluster import check_cluster_resources, init_ray, ray_address
from raysearch.config import TrialConfig
from raysearch.data.prepare import check_free_space, prepare_data, read_dataset
from raysearch.errors import RaysearchError
from raysearch.storage import join
from raysearch.train.worker import LoopConfig, train_loop_per_worker

__all__ = [
    "CONTROLLER_FAILURE_LIMIT",
    "SINGLE_TRIAL",
    "RunSettings",
    "driver_resources",
    "make_trainer",
    "run_single",
    "tune_trial_driver",
]

CONTROLLER_FAILURE_LIMIT = 3  # a worker group that cannot start fails the trial instead of hanging


# ----------------------------------------------------------------------------- Ray Train plumbing


def make_trainer(
    loop_config: LoopConfig,
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


class RunSettings(TypedDict):
    """The constants of a search that every trial driver gets (plain data: Tune pickles it).

    ``trial``: the fixed trial settings; ``space_names``: the searched parameters; ``task``: the
    dataset's task as a dict; ``manifest``, ``cache_dir``, ``experiment_dir``: URIs; the rest is
    the resource plan of one trial.
    """

    trial: dict[str, Any]
    space_names: list[str]
    max_epochs: int
    task: dict[str, Any]
    manifest: str
    cache_dir: str
    experiment_dir: str
    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    torch_threads: int


def tune_trial_driver(config: dict[str, Any], *, run: RunSettings) -> None:
    """The Tune function trainable of one trial: a one-worker trial runs its training loop
    right here (:mod:`raysearch.train.inline`: no Ray Train controller or worker processes to
    start); a trial of more workers builds and fits its TorchTrainer.

    ``config`` holds the sampled parameters; ``run`` the constants of the experiment.
    """
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    sampled = {k: v for k, v in config.items() if k in run["space_names"]}
    trial = {**run["trial"], **sampled, "max_epochs": run["max_epochs"]}
    loop_config: LoopConfig = {
        "trial": TrialConfig.from_dict(trial).to_dict(),
        "task": run.get("task") or {},
        "manifest": run["manifest"],
        "cache_dir": run["cache_dir"],
        "torch_threads": run["torch_threads"],
    }
    from raysearch.train.inline import inline_enabled

    if inline_enabled(run["workers"]):  # one worker: the loop runs here (raysearch.train.inline)
        from raysearch.train.inline import InlineSession

        train_loop_per_worker(loop_config, session=InlineSession(
            join(run["experiment_dir"], f"train-{trial_id}")))
        return
    from ray.tune.integration.ray_train import TuneReportCallback

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


class _LiveFeed:
    """Brings a Train run's reports to the driver's live view: a Ray Train callback (it runs in
    the Train controller) puts rank 0's metrics on a Ray queue, and a thread on the driver hands
    them to the :class:`~raysearch.report.live.LiveView` while ``fit()`` blocks."""

    def __init__(self, view, trial_id: str) -> None:
        self.view, self.trial_id = view, trial_id
        self.queue = None
        self._thread = None
        self._stop = None

    def callback(self):
        from ray.train import UserCallback
        from ray.util.queue import Queue

        # No CPU: the queue must not take a CPU that the trial's worker was sized to use.
        self.queue = Queue(actor_options={"num_cpus": 0})

        class _ToQueue(UserCallback):
            def __init__(self, queue) -> None:
                self.queue = queue

            def after_report(self, run_context, metrics, checkpoint):
                if metrics:
                    self.queue.put_nowait(dict(metrics[0]))

        return _ToQueue(self.queue)

    def _drain(self, timeout: float | None) -> None:
        from ray.util.queue import Empty

        try:
            while True:
                result = self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()
                self.view.result(self.trial_id, result)
        except Empty:
            return

    def __enter__(self):
        import threading

        self._stop = threading.Event()

        def pump() -> None:
            while not self._stop.is_set():
                try:
                    self._drain(0.5)
                except Exception:  # noqa: BLE001 - the queue's actor went away: the run is over
                    return

        self._thread = threading.Thread(target=pump, name="raysearch-live-feed", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread and show what is still queued."""
        if self._stop is not None and not self._stop.is_set():
            self._stop.set()
            self._thread.join(timeout=5)
            with contextlib.suppress(Exception):  # the queue's actor is gone: nothing to show
                self._drain(None)

    def __exit__(self, *exc):
        self.close()
        if self.queue is not None:
            with contextlib.suppress(Exception):  # already gone with the run
                self.queue.shutdown()


def driver_resources(run: RunSettings, *, driver_cpu: float) -> dict[str, float]:
    """What a trial's Tune driver asks for: ``driver_cpu`` when it only starts a Ray Train run
    (whose workers hold their own resources), or the one worker's CPUs and GPUs when it runs
    the loop itself (:mod:`raysearch.train.inline`)."""
    from raysearch.train.inline import inline_enabled

    if not inline_enabled(run["workers"]):
        return {"cpu": driver_cpu}
    out = {"cpu": float(run["cpus_per_worker"])}
    if run["gpus_per_worker"]:
        out["gpu"] = float(run["gpus_per_worker"])
    return out


SINGLE_TRIAL = "single"  # the trial id of `raysearch train`: its run folder is train-single


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

    It writes a complete experiment (``kind: train``): the manifest, the trial's checkpoints
    under ``train-single/``, ``trials.parquet`` (one row, trial id ``single``) and
    ``epochs.parquet``, so that the model can be ensembled, predicted with and served like a
    search's. Running it again on the same name continues from the latest checkpoint (``fresh``
    starts over: the old experiment is deleted only after every other check has passed). Returns
    the reported epochs. Raises :class:`~raysearch.errors.ExperimentLockedError` when another run
    holds the experiment, :class:`~raysearch.errors.ConfigError` for an unsafe name or a trial
    too big for the machine, and :class:`~raysearch.errors.DataError` for a data root without
    the dataset (these before torch or Ray is used: see :mod:`raysearch.train.preflight`).
    """
    from rich.console import Console

    from raysearch.experiment import ExperimentLock
    from raysearch.train.preflight import load_train_config

    console = console or Console(stderr=True)
    cfg, rest, data = load_train_config(config_path, data_root=data_root, name=name,
                                        storage=storage, address=address)
    storage, name = rest["storage"], rest["name"]
    exp_dir = join(storage, name)
    cache_dir = data.cache_dir or join(storage, "cache")
    with ExperimentLock(exp_dir, command="train"):
        return _run_single_locked(
            cfg, rest, data, storage=storage, name=name, exp_dir=exp_dir, cache_dir=cache_dir,
            fresh=fresh, address=address, verbose=verbose, console=console,
        )


def _run_single_locked(cfg, rest, data, *, storage, name, exp_dir, cache_dir, fresh, address,
                       verbose, console) -> pd.DataFrame:
    from raysearch.experiment import (
        check_writable,
        is_experiment,
        read_info,
        remove_experiment,
        results_tables,
        trial_summary,
        update_info,
        write_results,
    )
    from raysearch.models.factory import check_weights, checkpoint_bytes
    from raysearch.report.tables import epochs_table
    from raysearch.train.losses import weighting_notes

    # --- everything knowable, before anything is deleted and before Ray starts
    if fresh:
        remove_experiment(exp_dir, storage=storage, dry_run=True)
    elif is_experiment(exp_dir) and read_info(exp_dir).get("kind", "train") != "train":
        raise RaysearchError(
            f"{exp_dir} holds a `raysearch {read_info(exp_dir)['kind']}` experiment; use "
            "another --name, or --fresh to replace it"
        )
    else:
        check_writable(exp_dir)
    from raysearch.report.live import say_stage

    check_weights({(cfg.arch, cfg.weights)})
    say_stage(console, f"reading the dataset at {data.root}")
    manifest, task = read_dataset(data, console=console)
    train = manifest[manifest["split"] == "train"]
    if task.k == 1:
        for note in weighting_notes(train, scheme=cfg.class_weighting, fp_bias=cfg.fp_bias,
                                    group=task.group):
            console.print(f"[yellow]{note}[/]")
    check_free_space(manifest=manifest, image_sizes=[cfg.image_size], cache_dir=cache_dir,
                     experiment_dir=exp_dir,
                     checkpoint_bytes=checkpoint_bytes(cfg.arch)
                     * (task.k if cfg.binary_relevance else 1),
                     num_trials=1, console=console)
    if fresh:
        remove_experiment(exp_dir, storage=storage)
    update_info(exp_dir, kind="train", name=name, state="running", manifest="manifest.parquet",
                cache_dir=cache_dir, task=task.to_dict(),
                data={"root": data.root, "val_fraction": data.val_fraction, "seed": data.seed})
    say_stage(console, f"preparing data (decode-once cache at {cfg.image_size} px)")
    manifest_uri = prepare_data(manifest, experiment_dir=exp_dir, cache_dir=cache_dir,
                                image_sizes=[cfg.image_size])

    # --- the trial, under Ray Train
    say_stage(console, "starting Ray")
    init_ray(address=address, verbose=verbose)
    import ray

    if ray_address(address):  # a local machine was checked before Ray started
        check_cluster_resources(rest["resources"])
    res = rest["resources"]
    workers = res.workers_per_trial
    total_cpu = float(ray.cluster_resources().get("CPU", 1))
    gpus = res.gpus_per_worker if res.gpus_per_worker is not None else (
        1.0 if ray.cluster_resources().get("GPU", 0) else 0.0)
    cpus = res.cpus_per_worker or max(0.01, math.floor(total_cpu / workers * 100) / 100)
    update_info(exp_dir, resources={"workers": workers, "gpus_per_worker": gpus,
                                    "cpus_per_worker": cpus})  # for `raysearch status`
    loop_config: LoopConfig = {
        "trial": cfg.to_dict(), "task": task.to_dict(), "manifest": manifest_uri,
        "cache_dir": cache_dir, "torch_threads": max(1, round(cpus)),
    }
    from raysearch.report.live import LiveView

    view = LiveView(num_trials=1, max_epochs=cfg.max_epochs, console=console)
    feed = _LiveFeed(view, SINGLE_TRIAL)
    trainer = make_trainer(
        loop_config, run_name=f"train-{SINGLE_TRIAL}", storage=exp_dir, workers=workers,
        gpus_per_worker=gpus, cpus_per_worker=cpus, max_failures=res.max_failures,
        callbacks=[feed.callback()],
    )
    error = None
    with view, feed:
        view.start(SINGLE_TRIAL, cfg.to_dict())
        view.stage("starting the worker")
        try:
            trainer.fit()
        except Exception as e:  # the trial failed: still write what it left, then raise
            from raysearch.errors import first_line

            error = first_line(e)[:500]
            raise
        finally:
            feed.close()
            row, epochs = trial_summary(exp_dir, SINGLE_TRIAL, config=cfg.to_dict(),
                                        max_epochs=cfg.max_epochs, error=error)
            view.end(row)
            trials, epochs = results_tables([row], [epochs])
            write_results(exp_dir, trials, epochs)
            update_info(exp_dir, state="failed" if error else "finished", trials=1,
                        num_samples=1)
    if row["best_checkpoint"] is None:
        raise RaysearchError(f"trial {name} reported no checkpoint")
    console.print(epochs_table(epochs, title=f"{name}: {cfg.arch} @ {cfg.image_size}px"))
    console.print(f"best checkpoint: {join(exp_dir, row['best_checkpoint'])}")
    return epochs
