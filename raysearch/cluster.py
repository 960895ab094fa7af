"""The Ray session: connect to a cluster or start a local instance that is quiet, keeps its
dashboard on loopback, and tells its workers its own State API address.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

__all__ = ["init_ray", "local_ray_args"]


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
