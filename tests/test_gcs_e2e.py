"""gs:// end to end: a small search and its ensemble with every artefact in a (local) GCS bucket.

Dataset, decode-once cache, staged weights, Tune/Train storage and reports all live in the
emulator's bucket. The CLI runs in subprocesses that inherit the emulator's environment
(``STORAGE_EMULATOR_HOST``, ``FSSPEC_GCS_TOKEN=anon``), start their *own* Ray instance (so its
workers inherit that environment too) and never attach to another Ray instance on the machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pandas as pd
import pytest
import torch

from raysearch import storage
from raysearch.experiment import resolve
from tests.gcs_emulator import GcsEmulator, gcs_emulator  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow

ARCH = "mobilenet_v3_small"
GCS_SPACE = """
name: gcs
data: {{root: {root}, val_fraction: 0.2, seed: 0, cache_dir: {cache}}}
resources: {{workers_per_trial: 1, max_concurrent: 2, max_failures: 0}}
search: {{algorithm: tpe, seed: 0, num_samples: 2}}
scheduler: {{kind: fifo, max_epochs: 2, grace_period: 1}}
storage: reports-that-must-not-be-used
trial: {{weights: {weights}, batch_size: 16, image_size: 32, arch: {arch}, augment: none}}
space:
  lr: {{loguniform: [0.001, 0.01]}}
"""


def _cli_env(ray_tmp: str, local_cache: str) -> dict[str, str]:
    """The test session's environment (emulator variables included) for a CLI subprocess.

    ``ray.init()`` without an address connects to the cluster named in
    ``<RAY_TMPDIR or /tmp>/ray/ray_current_cluster`` (written by any ``ray start`` on this
    machine) and otherwise starts a new instance; a fresh ``RAY_TMPDIR`` makes it start its own.
    The pytest session's Ray instance (``ray.init`` in conftest) writes no such file either way.
    """
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAYSEARCH_LOCAL_CACHE": local_cache}
    env.pop("RAY_ADDRESS", None)
    assert env.get("STORAGE_EMULATOR_HOST") and env.get("FSSPEC_GCS_TOKEN") == "anon"
    return env


@contextlib.contextmanager
def _ray_tmpdir() -> Iterator[str]:
    """A fresh, short RAY_TMPDIR (Ray's socket paths must fit in 107 bytes), removed afterwards."""
    path = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "raysearch.cli", *args], env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )
    assert out.returncode == 0, f"raysearch {args[0]} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _stage_weights(uri: str) -> dict[str, torch.Tensor]:
    """A real state dict for ARCH (fixed seed, random init) uploaded to ``uri``."""
    from raysearch.models.factory import create_model

    torch.manual_seed(1234)
    state = create_model(ARCH, weights="none", dropout=0.0).state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.atomic_write_bytes(uri, buf.getvalue())
    return state


def _names(fs, path: str) -> set[str]:
    """Entry names directly below ``path``, listed afresh (gcsfs caches listings)."""
    fs.invalidate_cache()
    return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}


def test_search_and_ensemble_entirely_in_a_bucket(gcs_emulator: GcsEmulator, tmp_path):  # noqa: F811
    from raysearch.data.synth import make_demo_data

    fs = gcs_emulator.fs
    data = gcs_emulator.url("data")
    cache = gcs_emulator.url("cache")
    runs = gcs_emulator.url("runs")
    weights = gcs_emulator.url("weights", "x.pth")
    make_demo_data(data, seed=0, size="tiny", num_workers=1)
    staged = _stage_weights(weights)
    space = tmp_path / "gcs.yaml"
    # data.root points at a folder that does not exist: --data-root must override it.
    space.write_text(GCS_SPACE.format(root=tmp_path / "nowhere", cache=cache, weights=weights,
                                      arch=ARCH))
    local_cache = str(tmp_path / "local_cache")

    # --- the search, with the dataset, cache, weights and storage in the bucket
    with _ray_tmpdir() as ray_tmp:
        env = _cli_env(ray_tmp, local_cache)
        _run(["tune", str(space), "--data-root", data, "--storage", runs], env, timeout=600)
    exp = storage.join(runs, "gcs")
    _, exp_path = storage.get_fs(exp)
    top = _names(fs, exp_path)
    for name in ("trials.parquet", "epochs.parquet", "search_space.yaml", "experiment.json",
                 "manifest.parquet"):
        assert name in top, (name, sorted(top))
    assert not list(tmp_path.glob("reports-that-must-not-be-used*"))
    assert not os.path.exists("reports-that-must-not-be-used")

    info = json.loads(storage.read_bytes(storage.join(exp, "experiment.json")))
    assert info["manifest"] == "manifest.parquet" and info["cache_dir"] == cache
    assert info["kind"] == "search" and info["state"] == "finished"
    assert info["data"]["root"] == data
    manifest = storage.read_parquet(storage.join(exp, "manifest.parquet"))
    assert manifest["image_path"].str.startswith(f"{data}/MURA-v1.1/").all()

    # The decode-once cache: one complete entry per image size (only 32 px here).
    _, cache_path = storage.get_fs(cache)
    keys = _names(fs, cache_path)
    assert len(keys) == 1, keys
    entry = f"{cache_path}/{keys.pop()}"
    assert {"images.u8", "index.parquet", "meta.json"} <= _names(fs, entry)
    meta = json.loads(fs.cat(f"{entry}/meta.json"))
    assert fs.size(f"{entry}/images.u8") == len(manifest) * 32 * 32
    assert meta  # written last: its presence marks the entry complete

    # The weights came from the bucket, once per node, into the node-local weights cache.
    pulled = list((tmp_path / "local_cache" / "weights").glob("*/x.pth"))
    assert len(pulled) == 1
    assert torch.load(pulled[0], weights_only=True).keys() == staged.keys()

    trials = storage.read_parquet(storage.join(exp, "trials.parquet"))
    epochs = storage.read_parquet(storage.join(exp, "epochs.parquet"))
    assert len(trials) == 2 and (trials["status"] == "completed").all(), trials
    assert (trials["weights"] == weights).all()
    assert len(epochs) == 4 and not epochs.duplicated(["trial_id", "epoch"]).any()
    for tid, rel in zip(trials["trial_id"], trials["best_checkpoint"]):
        # Stored relative to the experiment; resolved, a full URI (Ray hands checkpoint paths
        # back without their scheme).
        assert rel.startswith(f"train-{tid}/checkpoint_"), rel
        uri = resolve(exp, rel)
        assert uri.startswith(f"{exp}/train-{tid}/checkpoint_"), uri
        assert storage.exists(storage.join(uri, "model.pt"))
        assert {"model.pt", "train_state.pt", "trial.json", "metrics.json", "history.json",
                "val_predictions.parquet"} <= _names(fs, storage.get_fs(uri)[1])
        assert f"train-{tid}" in top
        ckpt_state = torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, "model.pt"))),
                                weights_only=True)
        assert ckpt_state.keys() == staged.keys()

    # --- the ensemble: reads the experiment from the bucket, writes its reports beside it
    with _ray_tmpdir() as ray_tmp:
        out = _run(["ensemble", "--experiment", exp, "--top", "2", "--n-boot", "50"],
                   _cli_env(ray_tmp, local_cache), timeout=300)
    assert "ensemble" in out.stdout.lower()
    reports = storage.join(exp, "ensemble")
    written = _names(fs, storage.get_fs(reports)[1])
    assert {"members.parquet", "study_predictions.parquet", "image_predictions.parquet",
            "category_metrics.parquet", "worklist.csv", "ensemble.json"} <= written, written
    assert not [n for n in written if ".tmp-" in n]
    members = storage.read_parquet(storage.join(reports, "members.parquet"))
    assert sorted(members["trial_id"]) == sorted(trials["trial_id"])
    worklist = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(reports, "worklist.csv"))))
    test_studies = manifest.loc[manifest["split"] == "test", "study_id"].nunique()
    assert len(worklist) == test_studies > 0
    assert worklist["prob"].is_monotonic_decreasing

    # --- the same command again: the finished search resumes from the bucket, its Ray state
    # verified against the hashes raysearch signed (raysearch-trust.json in the bucket); the lock
    # it held is gone
    assert "raysearch-trust.json" in top and ".raysearch.lock" not in top
    with _ray_tmpdir() as ray_tmp:
        env = _cli_env(ray_tmp, local_cache)
        _run(["tune", str(space), "--data-root", data, "--storage", runs], env, timeout=600)
        # A pickle planted in the bucket: refused before Ray reads it, exit 2, one line.
        planted = next(n for n in _names(fs, exp_path) if n.startswith("searcher-state-"))
        fs.pipe_file(f"{exp_path}/{planted}", pickle.dumps({"not": "what raysearch wrote"}))
        refused = subprocess.run(
            [sys.executable, "-m", "raysearch.cli", "tune", str(space), "--data-root", data,
             "--storage", runs], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().startswith(f"raysearch: error: refusing to resume {exp}: Ray "
                                             f"would unpickle {planted}")
