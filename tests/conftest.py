"""Shared fixtures: a quiet environment for Ray, one Ray instance per session, demo datasets."""

from __future__ import annotations

import os

import pytest

# Ray writes an auth token under ~/.ray since 2.59 and phones home unless told not to.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> str:
    """A 'tiny' synthetic dataset in the MURA-v1.1 layout (parent folder path)."""
    from raysearch.synth import make_demo_data

    out = tmp_path_factory.mktemp("tiny_mura")
    make_demo_data(str(out), seed=0, size="tiny")
    return str(out)


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray instance for every test that needs Ray (ray.init costs seconds)."""
    import ray

    tmp = tmp_path_factory.mktemp("ray")
    os.environ.setdefault("RAYSEARCH_LOCAL_CACHE", str(tmp / "local_cache"))
    ray.init(num_cpus=2, include_dashboard=None, log_to_driver=False,
             runtime_env={"env_vars": {"RAYSEARCH_LOCAL_CACHE": str(tmp / "local_cache")}})
    yield ray
    ray.shutdown()
