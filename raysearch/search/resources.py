"""Search stage, resources: how much of the cluster each trial takes, and how many run at once,
so that trial drivers and their worker placement groups always fit (never a silent wait).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from raysearch.config import ResourcesConfig
from raysearch.errors import ConfigError

__all__ = ["DRIVER_CPU", "ResourcePlan", "plan_resources"]


DRIVER_CPU = 0.01  # the per-trial Tune function only waits on its TorchTrainer

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
