"""Launch: a local Ray instance whose workers find their own State API next to another one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# What Ray Train's PlacementGroupCleaner does from its worker every second: ask the State API
# whether an actor (its trial's controller) is alive.
ASK_FROM_A_WORKER = textwrap.dedent("""
    import ray
    from raysearch.train.trainer import init_ray

    init_ray()

    @ray.remote(num_cpus=0)
    class Controller:
        def ping(self):
            return True

    @ray.remote(num_cpus=0)
    def state_of(actor_id):
        from ray.util.state import get_actor

        return get_actor(actor_id, timeout=30).state

    controller = Controller.remote()
    ray.get(controller.ping.remote())
    print("STATE", ray.get(state_of.remote(controller._actor_id.hex())))
""")


@pytest.mark.slow
def test_workers_find_their_own_state_api_next_to_another_ray_instance(ray_session, tmp_path):
    # The pytest session's instance is up, so the subprocess's init_ray starts a second one
    # on this machine; without an address, Ray's State API client refuses to pick one.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, "-c", ASK_FROM_A_WORKER], capture_output=True, check=False,
                          text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "STATE ALIVE" in proc.stdout
