"""Tune across nodes: a local two-node Ray cluster (two ``ray start`` processes on loopback).

Each node has one CPU. The resource planner gives every trial one worker of just under one CPU
(plus a sliver for its driver) and runs two trials at a time, so the two trials can only run
side by side if they land on different nodes; ``epochs.parquet`` records each epoch's Ray node.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pandas as pd
import pytest

from raysearch.config import ResourcesConfig
from raysearch.search.resources import DRIVER_CPU, plan_resources

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
START_TIMEOUT_S = 90.0

MULTI_SPACE = """
name: multinode
data: {{root: {root}, val_fraction: 0.2, seed: 0}}
resources: {{workers_per_trial: 1, max_concurrent: 2, max_failures: 0}}
search: {{algorithm: tpe, seed: 0, num_samples: 2}}
scheduler: {{kind: fifo, max_epochs: 2, grace_period: 1}}
storage: {storage}
trial: {{weights: none, batch_size: 16, image_size: 32, arch: mobilenet_v3_small, augment: none}}
space:
  lr: {{loguniform: [0.001, 0.01]}}
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_env(temp_dir: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           # `ray start` records the cluster address under <RAY_TMPDIR>/ray; a private one keeps
           # other `ray.init()` calls on this machine from attaching to the test cluster.
           "RAY_TMPDIR": temp_dir}
    env.pop("RAY_ADDRESS", None)
    return env


def _start_node(args: list[str], *, env: dict[str, str], log_path: str) -> subprocess.Popen:
    """``ray start --block ...`` in its own session: its raylet, GCS etc. share its process group
    and die with it (``--block`` also shuts them down on SIGTERM)."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", "--num-cpus=1",
             "--node-ip-address=127.0.0.1", "--object-store-memory=100000000",
             f"--dashboard-agent-listen-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", *args],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # anything of ours that outlived `ray start`
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    code = (
        f"import ray; ray.init(address={address!r}, log_to_driver=False, logging_level='ERROR'); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=False)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


def _tail(path: str, n: int = 30) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


@contextlib.contextmanager
def two_node_cluster() -> Iterator[str]:
    """A head and a worker node, one CPU each, on 127.0.0.1. Yields the GCS address."""
    temp_dir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's socket paths must fit
    env = _node_env(temp_dir)
    address = f"127.0.0.1:{_free_port()}"
    procs: list[subprocess.Popen] = []
    logs = [os.path.join(temp_dir, "head.log"), os.path.join(temp_dir, "worker.log")]
    try:
        procs.append(_start_node(
            ["--head", f"--port={address.rsplit(':', 1)[1]}", f"--temp-dir={temp_dir}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}"],
            env=env, log_path=logs[0],
        ))
        procs.append(_start_node([f"--address={address}"], env=env, log_path=logs[1]))
        deadline = time.monotonic() + START_TIMEOUT_S
        while _alive_nodes(address, env) < 2:
            for proc, log in zip(procs, logs):
                assert proc.poll() is None, f"`ray start` exited early:\n{_tail(log)}"
            assert time.monotonic() < deadline, (
                f"the two-node cluster did not come up:\n{_tail(logs[0])}\n{_tail(logs[1])}"
            )
            time.sleep(1)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_plan_fits_workers_node_by_node():
    # One 2-CPU node: the even share, as before.
    one = plan_resources(ResourcesConfig(), {"CPU": 2.0}, node_cpus=[2.0])
    assert (one.max_concurrent, one.cpus_per_worker) == (2, 0.99)
    # Two 1-CPU nodes: both drivers may land on one node, so a worker must fit beside them.
    two = plan_resources(ResourcesConfig(), {"CPU": 2.0}, node_cpus=[1.0, 1.0])
    assert two.max_concurrent == 2
    assert 2 * DRIVER_CPU + two.cpus_per_worker <= 1.0 and two.cpus_per_worker >= 0.9
    # A CPU-less head (a GPU-cluster style head) holds no workers; the 3-CPU nodes hold them all.
    res = ResourcesConfig(workers_per_trial=2)
    three = plan_resources(res, {"CPU": 6.0}, node_cpus=[0.0, 3.0, 3.0])
    k, p = three.max_concurrent, three.cpus_per_worker
    assert k == 3 and sum(int((3.0 - k * DRIVER_CPU) / p) for _ in range(2)) >= k * 2


@pytest.mark.slow
def test_search_spreads_trials_over_two_nodes(tmp_path, tiny_root):
    space = tmp_path / "multinode.yaml"
    space.write_text(MULTI_SPACE.format(root=tiny_root, storage=tmp_path / "reports"))
    with two_node_cluster() as address:
        env = _node_env(str(tmp_path))  # the driver only connects; it starts no Ray processes
        env["RAYSEARCH_LOCAL_CACHE"] = str(tmp_path / "local_cache")
        out = subprocess.run(
            [sys.executable, "-m", "raysearch.cli", "tune", str(space), "--address", address],
            env=env, capture_output=True, text=True, timeout=600, check=False,
        )
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    exp = tmp_path / "reports" / "multinode"
    trials = pd.read_parquet(exp / "trials.parquet")
    epochs = pd.read_parquet(exp / "epochs.parquet")
    assert len(trials) == 2 and (trials["status"] == "completed").all(), trials
    assert len(epochs) == 4 and epochs["node_id"].notna().all()
    # Each trial stays on one node, and the two trials ran on different nodes.
    per_trial = epochs.groupby("trial_id")["node_id"].nunique()
    assert (per_trial == 1).all(), epochs[["trial_id", "epoch", "node_id"]]
    assert epochs["node_id"].nunique() == 2, epochs[["trial_id", "epoch", "node_id"]]
    # The planner sized workers so that two run at once on two 1-CPU nodes even when both tiny
    # trial drivers sit on the same node (0.99 each would leave the second worker waiting).
    # Epochs here last about a second, much less than the jitter in worker start-up, so the
    # overlap is checked on the plan rather than on report times.
    plan = re.search(r"2 at a time, 1 worker\(s\) x ([0-9.]+) CPU", out.stdout)
    assert plan, out.stdout[:2000]
    assert 2 * DRIVER_CPU + float(plan.group(1)) <= 1.0, plan.group(0)
