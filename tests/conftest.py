"""Shared fixtures: a quiet environment for Ray, one Ray instance per session, demo datasets."""

from __future__ import annotations

import os
import tempfile

import pytest

# Ray writes an auth token under ~/.ray since 2.59 and phones home unless told not to.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# One trust key (experiment signatures) for the session and its subprocesses, not ~/.config's;
# library logs of CLI runs go to a scratch folder, not ~/.cache.
os.environ.setdefault("RAYSEARCH_TRUST_KEY", "raysearch-test-session")
os.environ.setdefault("RAYSEARCH_LOG_DIR", tempfile.mkdtemp(prefix="raysearch-logs-"))

# Fault injection (tests/faults.py) sets its environment variable on import: before Ray starts.
import tests.faults  # noqa: F401


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> str:
    """A 'tiny' synthetic dataset in the MURA-v1.1 layout (parent folder path)."""
    from raysearch.data.synth import make_demo_data

    out = tmp_path_factory.mktemp("tiny_mura")
    make_demo_data(str(out), seed=0, size="tiny")
    return str(out)


@pytest.fixture(scope="session")
def permissions_enforced(tmp_path_factory) -> bool:
    """Whether this user is refused a file it has no permission for (root, with its capability
    to bypass permissions, is not): tests that chmod a file skip when it is False."""
    probe = tmp_path_factory.mktemp("permissions") / "probe"
    probe.write_text("x")
    probe.chmod(0)
    try:
        probe.read_text()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o600)
    return False


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray instance for every test that needs Ray (ray.init costs seconds)."""
    import ray

    from raysearch.cluster import local_ray_args

    tmp = tmp_path_factory.mktemp("ray")
    os.environ.setdefault("RAYSEARCH_LOCAL_CACHE", str(tmp / "local_cache"))
    # local_ray_args: the searches some tests run in subprocesses start Ray instances of their own.
    ray.init(num_cpus=2, log_to_driver=False,
             **local_ray_args({"RAYSEARCH_LOCAL_CACHE": str(tmp / "local_cache")}))
    yield ray
    ray.shutdown()


SMALL_SPACE = """
name: small
data: {{root: {root}, val_fraction: 0.2, seed: 0}}
resources: {{workers_per_trial: 1, max_concurrent: 2, max_failures: 0}}
search:
  algorithm: tpe
  seed: 0
  num_samples: 6
  points_to_evaluate:
    - {{lr: 0.003}}
    - {{lr: 0.03}}
    - {{lr: 0.001}}
# reduction_factor 4: a trial goes on past epoch 1 only when it is in the best quarter so far,
# so ASHA is all but certain to stop one of the six.
scheduler: {{kind: asha, max_epochs: 3, grace_period: 1, reduction_factor: 4}}
storage: {storage}
trial: {{weights: none, batch_size: 16, augment: light, image_size: 32, arch: mobilenet_v3_small}}
space:
  lr: {{choice: [0.001, 0.003, 0.01, 0.03]}}
  dropout: {{uniform: [0.0, 0.3]}}
  # A conditional parameter (the search space's `when`). Fault injection: every trial with lr 0.03
  # raises in its first epoch (tests/faults.py); the search must go on.
  fp_bias: {{constant: 1.0, when: {{lr: [0.03]}}}}
"""


@pytest.fixture(scope="session")
def small_space(tmp_path_factory, tiny_root) -> str:
    """A search-space file for a small real search on the tiny demo data."""
    d = tmp_path_factory.mktemp("small_space")
    path = d / "small.yaml"
    path.write_text(SMALL_SPACE.format(root=tiny_root, storage=d / "reports"))
    return str(path)


@pytest.fixture(scope="session")
def small_experiment(small_space, ray_session) -> str:
    """A finished real search (6 trials x <= 3 epochs, 32 px, one injected failure)."""
    import io

    from rich.console import Console

    from raysearch.search.space import load_search_space
    from raysearch.search.tune import run_search

    spec = load_search_space(small_space)
    return run_search(spec, console=Console(file=io.StringIO(), width=120))
