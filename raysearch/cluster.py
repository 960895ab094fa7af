"""The Ray session: connect to a cluster or start a local instance that is quiet, keeps its
dashboard on loopback, and tells its workers its own State API address.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

__all__ = [
    "check_cluster_resources",
    "check_resources",
    "check_worker_resources",
    "init_ray",
    "local_ray_args",
    "local_resources",
    "ray_address",
]


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
    address = ray_address(address)
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
        import ray._private.worker

        from raysearch.logs import quiet_ray_driver

        quiet_ray_driver(ray._private.worker)  # worker-start warnings: to the log, not the view

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


def ray_address(address: str | None = None) -> str | None:
    """The cluster ``init_ray`` connects to (``address``, else RAY_ADDRESS), or None: a local
    instance started on this machine."""
    return address or os.environ.get("RAY_ADDRESS") or None


# ----------------------------------------------------------------------------- resources


def local_resources() -> dict[str, float]:
    """``{"CPU": n, "GPU": g}`` that a local Ray instance started here would have, found without
    importing Ray or torch.

    CPUs as Ray counts them (``ray._private.utils.get_num_cpus``): the machine's, capped by a
    cgroup CPU quota (a container's ``--cpus``), unless RAY_USE_MULTIPROCESSING_CPU_COUNT is
    set. GPUs as Ray finds NVIDIA ones: the ids in CUDA_VISIBLE_DEVICES when it is set, else the
    devices the driver lists under /proc/driver/nvidia/gpus (none without the driver).
    """
    import multiprocessing

    cpus = multiprocessing.cpu_count()
    if not os.environ.get("RAY_USE_MULTIPROCESSING_CPU_COUNT"):
        quota = _cgroup_cpu_quota()
        if quota is not None:
            cpus = min(cpus, max(1, int(quota)))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = len([d for d in visible.split(",") if d.strip() and d.strip() != "NoDevFiles"])
    else:
        try:
            gpus = len(os.listdir("/proc/driver/nvidia/gpus"))
        except OSError:
            gpus = 0
    return {"CPU": float(cpus), "GPU": float(gpus)}


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``, or v1 quota / period), None when unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return float(quota) / float(period) if quota != "max" else None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as q, \
                open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as per:
            quota = float(q.read())
            return quota / float(per.read()) if quota > 0 else None
    except (OSError, ValueError):
        return None


def check_worker_resources(
    res, nodes: list[dict[str, float]], *, where: str, may_grow: bool = False
) -> None:
    """Refuse a trial whose workers cannot start on ``nodes``, before anything waits for them.

    ``res`` is a :class:`~raysearch.config.ResourcesConfig`; ``nodes`` the CPU and GPU counts of
    each node (``[local_resources()]`` before a local Ray starts, the alive nodes of a cluster
    once connected); ``where`` names the machine or cluster in the message. One worker must fit
    on one node, and all of a trial's workers on the nodes together, or Ray Train waits for them
    until its controller gives up (minutes later, seen as a ``ControllerError``). The same check
    serves ``raysearch train`` and ``raysearch tune``.

    ``may_grow``: a cluster whose autoscaler may add nodes it does not show yet. A trial on GPUs
    is then not checked at all (cluster.yaml's head has 1 CPU and no GPU; its GPU workers start
    on demand), and a CPU-only trial is held to the nodes there are, as the resource plan holds it
    (``search.resources.plan_resources``). ``gpus_per_worker`` left out means 1 GPU when some node
    has one, else none, as in the plan.

    Raises :class:`~raysearch.errors.ConfigError` naming the ``resources.*`` key, the amount
    asked for and the amount there is.
    """
    from raysearch.errors import ConfigError

    workers = res.workers_per_trial
    gpus = res.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if any(float(n.get("GPU", 0)) for n in nodes) else 0.0
    if may_grow and gpus:
        return
    for kind, key, per_worker in (("CPU", "cpus_per_worker", res.cpus_per_worker),
                                  ("GPU", "gpus_per_worker", res.gpus_per_worker)):
        if not per_worker:
            continue  # derived from what there is by the resource plan
        counts = [float(n.get(kind, 0)) for n in nodes] or [0.0]
        largest, total = max(counts), sum(counts)
        if per_worker > largest + 1e-9:
            raise ConfigError(
                f"resources.{key}: {per_worker:g} {kind}s per worker, but {where} has "
                f"{largest:g} {kind}s{' on its largest node' if len(counts) > 1 else ''}; "
                f"lower resources.{key}", key=f"resources.{key}"
            )
        slots = sum(int(c / per_worker + 1e-9) for c in counts)
        if workers > slots:
            raise ConfigError(
                f"resources.workers_per_trial: {workers} workers x {per_worker:g} {kind}s, but "
                f"{where} has {total:g} {kind}s (room for {slots} such workers); lower "
                f"resources.workers_per_trial or resources.{key}",
                key="resources.workers_per_trial",
            )


def check_resources(res, *, address: str | None = None) -> None:
    """Before Ray starts: the workers of one trial (``res``, a ResourcesConfig) must fit this
    machine when the run starts a local Ray instance (no ``address``, no RAY_ADDRESS). A cluster
    is checked once connected (:func:`check_cluster_resources`). Raises ConfigError."""
    if ray_address(address) is None:
        check_worker_resources(res, [local_resources()], where="this machine")


def check_cluster_resources(res) -> None:
    """Once connected: the workers of one trial must fit the alive nodes of the Ray cluster, as
    far as an autoscaler cannot change that (see :func:`check_worker_resources`, ``may_grow``).
    Raises ConfigError."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    check_worker_resources(res, nodes, where="the Ray cluster", may_grow=True)
