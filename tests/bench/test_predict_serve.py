"""Bench predict (no Ray) and bench serve (Ray Serve, slow): the runs complete, count what they
say, and bench serve checks every answer against the predictor."""

from __future__ import annotations

import io
import os
import tempfile

import pytest
from rich.console import Console

from raysearch.bench.predict import bench_predict
from raysearch.data.mura import read_mura
from raysearch.errors import ConfigError
from tests.inference.test_predictor import two_member_ensemble


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_root):
    """An experiment with a manifest and a two-member ensemble (two sizes, two architectures)."""
    exp = tmp_path_factory.mktemp("bench") / "exp"
    two_member_ensemble(exp)
    manifest = read_mura(tiny_root)
    manifest.attrs = {}  # what the reader found beside the data: not part of the table
    manifest.to_parquet(exp / "manifest.parquet")
    return str(exp)


def _console() -> Console:
    return Console(file=io.StringIO(), width=200, color_system=None)


def test_bench_predict_times_the_whole_command_against_the_pure_forward(experiment, tiny_root):
    console = _console()
    r = bench_predict(ensemble=experiment, rounds=2, batch_size=16, device="cpu", console=console)
    n_test = int((read_mura(tiny_root)["split"] == "test").sum())
    assert r["images"] == n_test and r["members"] == 2 and r["rounds"] == 2
    assert r["flag"] is not None or r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    assert r["predict_images_per_s"] > 0 and r["pure_images_per_s"] > 0
    text = console.file.getvalue()
    assert f"{n_test} test images, 2 members" in text and ("2 paired rounds" in text or "not a result" in text)


def test_bench_predict_needs_an_experiments_manifest(tmp_path):
    with pytest.raises(ConfigError, match="neither an ensemble folder"):
        bench_predict(ensemble=str(tmp_path), console=_console())


@pytest.mark.slow
@pytest.mark.bench
def test_bench_serve_loses_nothing_and_matches_the_predictor(experiment, monkeypatch):
    from raysearch.bench.serve import bench_serve

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # A short RAY_TMPDIR: the dashboard's AF_UNIX sockets live under it (at most 107 bytes).
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="rs-bs-", dir="/tmp"))
    import ray

    ray.shutdown()
    console = _console()
    try:
        r = bench_serve(ensemble=experiment, studies=8, clients=4, rounds=2, console=console)
    finally:
        ray.shutdown()
    assert r["lost"] == 0 and r["studies"] == 8
    for route in ("batched", "single"):
        assert r[route]["studies_per_s"] > 0
        assert r[route]["p50_ms"] <= r[route]["p95_ms"] <= r[route]["p99_ms"]
    assert "every answer equal to the predictor's" in console.file.getvalue()
    assert os.environ.get("RAY_ADDRESS") is None
