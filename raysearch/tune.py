"""Tune stage: many trials under Ray Tune with Optuna (TPE) and ASHA; resumable and fault tolerant.

``run_search(spec)`` prepares the data once on the driver, turns the search space into an Optuna
define-by-run function (conditional parameters allowed), sizes concurrency so that trial drivers
plus their worker placement groups always fit the cluster, and writes ``trials.parquet``,
``epochs.parquet``, ``search_space.yaml`` and ``experiment.json`` under the experiment folder.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import yaml

from raysearch.config import ResourcesConfig
from raysearch.errors import ConfigError, ExperimentExistsError
from raysearch.results import SearchProgress, collect_results
from raysearch.space import Param, SearchSpace
from raysearch.storage import (
    atomic_write_parquet,
    atomic_write_text,
    exists,
    get_fs,
    join,
    ray_storage_args,
    read_bytes,
)

DRIVER_CPU = 0.01  # the per-trial Tune function only waits on its TorchTrainer
# What the search minimises, for Optuna and ASHA alike: the lowest val_loss a trial has reached
# so far. A trial is worth its best checkpoint (that is what `ensemble` loads), so Optuna should
# learn from its best epoch, not its last, and ASHA should not cut a trial for one noisy epoch.
OBJECTIVE = "best_val_loss"


# ----------------------------------------------------------------------------- search space


class DefineByRun:
    """An Optuna define-by-run function: samples in file order, honouring ``when`` conditions.

    A class rather than a closure because Ray pickles the searcher with the experiment state.
    """

    def __init__(self, space: tuple[Param, ...]) -> None:
        self.space = space

    def __call__(self, trial) -> dict[str, Any]:
        values: dict[str, Any] = {}
        constants: dict[str, Any] = {}
        for p in self.space:
            if not p.applies(values):
                continue
            if p.kind == "constant":
                constants[p.name] = values[p.name] = p.values[0]
            elif p.kind == "choice":
                values[p.name] = trial.suggest_categorical(p.name, list(p.values))
            elif p.kind == "int":
                values[p.name] = trial.suggest_int(
                    p.name, int(p.low), int(p.high), step=int(p.step or 1)
                )
            else:
                values[p.name] = trial.suggest_float(
                    p.name, float(p.low), float(p.high), log=p.kind == "loguniform",
                    step=p.step if p.kind == "uniform" else None,
                )
        return constants


def image_sizes(spec: SearchSpace) -> list[int]:
    """Image sizes that trials may ask for, so the driver can build their caches up front."""
    sizes: set[int] = set()
    if not any(p.name == "image_size" for p in spec.space):
        sizes.add(int(spec.trial.get("image_size", 320)))
    for p in spec.space:
        if p.name == "image_size" and p.kind in ("choice", "constant"):
            sizes.update(int(v) for v in p.values)
        elif p.name == "image_size" and p.kind == "int" and p.high - p.low <= 512:
            step = int(p.step or 1)
            sizes.update(range(int(p.low), int(p.high) + 1, step))
    for point in spec.search.points_to_evaluate:
        if "image_size" in point:
            sizes.add(int(point["image_size"]))
    return sorted(sizes)


def weight_sources(spec: SearchSpace) -> set[tuple[str, str]]:
    """Every (arch, weights) pair a trial of ``spec`` may ask for."""

    def values(name: str, default: str) -> set[str]:
        for p in spec.space:
            if p.name == name and p.kind in ("choice", "constant"):
                return {str(v) for v in p.values}
        return {str(spec.trial.get(name, default))}

    return {(a, w) for a in values("arch", "densenet169") for w in values("weights", "imagenet")}


# ----------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class ResourcePlan:
    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    max_concurrent: int
    torch_threads: int


def plan_resources(
    res: ResourcesConfig, cluster: dict[str, float], *, node_cpus: list[float] | None = None
) -> ResourcePlan:
    """Per-trial resources and concurrency that cannot deadlock.

    Every running trial needs its driver (DRIVER_CPU) *and* its whole worker placement group; if
    ``max_concurrent`` drivers start but their workers do not fit, every trial waits forever.
    ``node_cpus`` (the CPUs of each alive node) lets a derived per-worker share also fit node by
    node: Ray packs the tiny drivers onto one node, and a worker sized to the cluster-wide share
    may then fit on no node at all, so trials that could run side by side run one after another.
    """
    total_cpu = float(cluster.get("CPU", 0))
    total_gpu = float(cluster.get("GPU", 0))
    w = res.workers_per_trial
    gpus = res.gpus_per_worker if res.gpus_per_worker is not None else (1.0 if total_gpu else 0.0)
    if gpus > 0:
        cpus = res.cpus_per_worker if res.cpus_per_worker is not None else 2.0
        if total_gpu >= gpus * w:
            k = int(total_gpu // (gpus * w))
            k = min(k, res.max_concurrent) if res.max_concurrent else k
        else:  # an autoscaling cluster with no GPU node up yet: trust the file
            k = res.max_concurrent or 1
        return ResourcePlan(w, gpus, cpus, k, max(1, int(cpus)))
    if total_cpu < DRIVER_CPU + w * 0.01:
        raise ConfigError(f"the Ray cluster has no CPUs to run trials on ({cluster})")
    per_worker = res.cpus_per_worker
    k = res.max_concurrent or max(1, int(total_cpu // (w * (per_worker or 1.0))))
    if per_worker is None:
        # Share the machine evenly, leaving room for the k drivers.
        per_worker = math.floor((total_cpu - DRIVER_CPU * k) / (k * w) * 100) / 100
        if node_cpus:
            per_worker = _fit_nodes(per_worker, node_cpus, drivers=k, workers=k * w)
    need = k * (DRIVER_CPU + w * per_worker)
    if per_worker <= 0 or need > total_cpu + 1e-9:
        raise ConfigError(
            f"resources: {k} concurrent trials x {w} workers x {per_worker} CPUs (+ drivers) need "
            f"{need:.2f} CPUs but the cluster has {total_cpu:g}; lower resources.max_concurrent, "
            "workers_per_trial or cpus_per_worker"
        )
    return ResourcePlan(w, 0.0, per_worker, k, max(1, round(per_worker)))


def _fit_nodes(per_worker: float, node_cpus: list[float], *, drivers: int, workers: int) -> float:
    """The largest share <= ``per_worker`` (in 0.01 steps) that fits ``workers`` workers on the
    nodes even when all ``drivers`` land on the same node (room for them is kept on every node)."""
    def slots(p: float) -> int:
        return sum(int((c - DRIVER_CPU * drivers) / p + 1e-9) for c in node_cpus if c > 0)

    while per_worker > 0.01 and slots(per_worker) < workers:
        per_worker = round(per_worker - 0.01, 2)
    return per_worker


# ----------------------------------------------------------------------------- the search


def run_search(
    spec: SearchSpace,
    *,
    resume: bool = False,
    overwrite: bool = False,
    address: str | None = None,
    verbose: bool = False,
    console=None,
) -> str:
    """Run (or resume) the search described by ``spec``. Returns the experiment folder URI."""
    from rich.console import Console

    console = console or Console(stderr=True)
    exp_dir = spec.experiment_dir
    spec_yaml = yaml.safe_dump(spec.to_dict(), sort_keys=False)
    restoring = _check_existing(spec, exp_dir, spec_yaml, resume=resume, overwrite=overwrite)
    from raysearch.models import check_weights

    check_weights(weight_sources(spec))

    from raysearch.launch import init_ray

    init_ray(address=address, verbose=verbose)
    import optuna
    import ray

    if not verbose:  # Optuna logs every study it creates at INFO
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    node_cpus = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    plan = plan_resources(spec.resources, ray.cluster_resources(), node_cpus=node_cpus)
    console.print(
        f"[bold]{spec.name}[/]: {spec.search.num_samples} trials, {plan.max_concurrent} at a time, "
        f"{plan.workers} worker(s) x {plan.cpus_per_worker:g} CPU"
        + (f" + {plan.gpus_per_worker:g} GPU" if plan.gpus_per_worker else "")
        + f" per trial -> {exp_dir}"
    )

    # Data once, on the driver: manifest, split and decode-once caches for every image size.
    manifest_uri = join(exp_dir, "manifest.parquet")
    if not (restoring and exists(manifest_uri)):
        from raysearch.launch import prepare_data

        prepare_data(
            root=spec.data.root, val_fraction=spec.data.val_fraction, seed=spec.data.seed,
            skip_bad=spec.data.skip_bad, experiment_dir=exp_dir, cache_dir=spec.cache_dir,
            image_sizes=image_sizes(spec), console=console,
        )
    atomic_write_text(join(exp_dir, "search_space.yaml"), spec_yaml)
    atomic_write_text(
        join(exp_dir, "experiment.json"),
        json.dumps(
            {
                "name": spec.name, "storage": spec.storage, "experiment_dir": exp_dir,
                "manifest": manifest_uri, "cache_dir": spec.cache_dir,
                "data": {"root": spec.data.root, "val_fraction": spec.data.val_fraction,
                         "seed": spec.data.seed},
            },
            indent=1,
        ),
    )

    run = {
        "trial": dict(spec.trial),
        "space_names": [p.name for p in spec.space],
        "max_epochs": spec.scheduler.max_epochs,
        "manifest": manifest_uri,
        "cache_dir": spec.cache_dir,
        "experiment_dir": exp_dir,
        "workers": plan.workers,
        "gpus_per_worker": plan.gpus_per_worker,
        "cpus_per_worker": plan.cpus_per_worker,
        "torch_threads": plan.torch_threads,
    }
    progress = SearchProgress(spec, console=console)
    tuner = _make_tuner(spec, plan, run, progress, restoring=restoring)
    if restoring and spec.scheduler.kind == "asha":
        from raysearch.asha import restore_rungs, trial_histories

        # Ray restores the searcher but not ASHA's rungs (ray#30838); rebuild them.
        histories = trial_histories(exp_dir)
        n = restore_rungs(tuner._local_tuner._tune_config.scheduler, histories,
                          metric=OBJECTIVE, mode="min")
        console.print(f"ASHA rungs rebuilt from the checkpoints of {len(histories)} trial(s): {n} records")
    t0 = time.time()
    with progress:
        grid = tuner.fit()
    trials, epochs = collect_results(grid, spec)
    atomic_write_parquet(epochs, join(exp_dir, "epochs.parquet"))
    atomic_write_parquet(trials, join(exp_dir, "trials.parquet"))
    from raysearch.report import best_trials_table

    console.print(best_trials_table(trials, title=f"{spec.name}: best trials"))
    n_failed = int((trials["status"] == "failed").sum())
    console.print(
        f"{len(trials)} trials ({n_failed} failed), {int(epochs.shape[0])} epochs in "
        f"{time.time() - t0:.0f} s. Results: {join(exp_dir, 'trials.parquet')}"
    )
    return exp_dir


def _check_existing(spec, exp_dir, spec_yaml, *, resume, overwrite) -> bool:
    """True when an existing experiment should be restored; refuse to overwrite silently."""
    from ray.tune import Tuner

    state_exists = Tuner.can_restore(**_restore_path_args(exp_dir))
    if overwrite:
        fs, path = get_fs(exp_dir)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        return False
    if not state_exists:
        if resume:
            raise ConfigError(f"--resume: no experiment to resume at {exp_dir}")
        return False
    saved = join(exp_dir, "search_space.yaml")
    if exists(saved) and read_bytes(saved).decode() != spec_yaml:
        raise ExperimentExistsError(
            f"experiment {spec.name!r} already exists at {exp_dir} with a different search space; "
            "use --name to start a new one or --overwrite to replace it",
            experiment_dir=exp_dir,
        )
    return True


def _restore_path_args(exp_dir: str) -> dict[str, Any]:
    args = ray_storage_args(exp_dir)
    out = {"path": args["storage_path"]}
    if "storage_filesystem" in args:
        out["storage_filesystem"] = args["storage_filesystem"]
    return out


def _make_tuner(spec: SearchSpace, plan: ResourcePlan, run: dict, progress, *, restoring: bool):
    from ray import tune

    from raysearch.asha import make_scheduler
    from raysearch.launch import tune_trial_driver
    from raysearch.sampler import MultiFidelitySearch, make_sampler

    trainable = tune.with_resources(
        tune.with_parameters(tune_trial_driver, run=run), {"cpu": DRIVER_CPU}
    )
    if restoring:
        tuner = tune.Tuner.restore(
            trainable=trainable, resume_unfinished=True, resume_errored=False,
            **_restore_path_args(spec.experiment_dir),
        )
        # Callbacks are not saved with the experiment; put the live view back.
        tuner._local_tuner._run_config.callbacks = [progress]
        return tuner
    sampler = make_sampler(spec)
    searcher = MultiFidelitySearch(
        space=DefineByRun(spec.space), metric=OBJECTIVE, mode="min", sampler=sampler,
        max_epochs=spec.scheduler.max_epochs,
        points_to_evaluate=[dict(p) for p in spec.search.points_to_evaluate] or None,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE, mode="min", search_alg=searcher, scheduler=make_scheduler(spec),
            num_samples=spec.search.num_samples, max_concurrent_trials=plan.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            **ray_storage_args(spec.storage),
            failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
            callbacks=[progress],
            verbose=0,
        ),
    )
