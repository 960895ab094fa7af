"""scripts/gpu_check.sh --cpu: the device check in small, on the CPU. The GPU machine it is for
has no Ray, no Optuna and no fsspec; the first test runs it with those three unimportable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BLOCK = textwrap.dedent("""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("ray", "optuna", "fsspec", "gcsfs"):
                raise ImportError(f"{name} is not installed on the GPU machine")
            return None

    sys.meta_path.insert(0, Block())
    from raysearch.bench.gpu_check import main
    sys.exit(main(["--cpu"]))
""")


def test_the_device_check_runs_without_ray_optuna_or_fsspec():
    out = subprocess.run([sys.executable, "-c", BLOCK], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, check=False, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("device   CPU; torch ")
    for name in ("step", "finetune", "predictor", "ddp"):
        assert any(line.startswith(f"check {name:9s} ok ") for line in lines), out.stdout
    assert "check ray       ok   skipped: ray is not installed here" in lines
    assert lines[-1] == "4/4 checks passed"
    assert "0 backbone tensors moved (want 0), head moved" in out.stdout
    assert "ratio " in out.stdout and "decisions agree 16/16" in out.stdout


def test_gpu_check_sh_cpu_runs_from_the_source_tree():
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", "--no-ray"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=False,
                         env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == "4/4 checks passed"
    assert "check ray       ok   skipped (--no-ray)" in out.stdout


def test_without_a_gpu_the_full_check_says_so():
    out = subprocess.run([sys.executable, "-m", "raysearch.bench.gpu_check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2 and "no CUDA device here; use --cpu" in out.stderr
