"""Tune: a real small search, resume after SIGKILL, fault injection, resource planning."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from raysearch.config import ResourcesConfig
from raysearch.errors import ConfigError
from raysearch.search.resources import plan_resources
from raysearch.search.searcher import DefineByRun
from raysearch.search.space import load_search_space
from raysearch.search.tune import image_sizes
from tests.test_schema import assert_matches_schema


def test_plan_resources_never_oversubscribes():
    plan = plan_resources(ResourcesConfig(), {"CPU": 2.0})
    assert plan.max_concurrent == 2 and plan.gpus_per_worker == 0
    # Two drivers at 0.01 CPU plus two workers must fit in 2 CPUs.
    assert plan.max_concurrent * (0.01 + plan.cpus_per_worker) <= 2.0
    plan = plan_resources(ResourcesConfig(workers_per_trial=2), {"CPU": 2.0})
    assert plan.max_concurrent == 1 and 0.01 + 2 * plan.cpus_per_worker <= 2.0
    plan = plan_resources(ResourcesConfig(), {"CPU": 32.0, "GPU": 4.0})
    assert (plan.max_concurrent, plan.gpus_per_worker) == (4, 1.0)
    plan = plan_resources(ResourcesConfig(workers_per_trial=2), {"CPU": 32.0, "GPU": 4.0})
    assert plan.max_concurrent == 2
    with pytest.raises(ConfigError, match="need .* CPUs but the cluster has 2"):
        plan_resources(ResourcesConfig(max_concurrent=3, cpus_per_worker=1), {"CPU": 2.0})


class FakeTrial:
    """Stands in for optuna.Trial's suggest API with fixed answers."""

    def __init__(self, answers):
        self.answers = answers
        self.asked = []

    def suggest_categorical(self, name, choices):
        self.asked.append(name)
        assert self.answers[name] in choices
        return self.answers[name]

    def suggest_float(self, name, low, high, log=False, step=None):
        self.asked.append(name)
        return self.answers.get(name, low)

    def suggest_int(self, name, low, high, step=1):
        self.asked.append(name)
        return self.answers.get(name, low)


def test_define_by_run_honours_conditions(small_space):
    spec = load_search_space(small_space)
    sample = DefineByRun(spec.space)
    t = FakeTrial({"lr": 0.03})
    assert sample(t) == {"fp_bias": 1.0}
    t = FakeTrial({"lr": 0.001})
    assert sample(t) == {} and t.asked == ["lr", "dropout"]


def test_image_sizes_for_the_driver_to_cache():
    spec = load_search_space("search_spaces/demo.yaml")
    assert image_sizes(spec) == [48, 64, 96]


@pytest.mark.slow
def test_small_search_writes_results(small_experiment):
    trials = pd.read_parquet(os.path.join(small_experiment, "trials.parquet"))
    epochs = pd.read_parquet(os.path.join(small_experiment, "epochs.parquet"))
    assert len(trials) == 6 and trials["trial_id"].is_unique
    for col in ("trial_id", "status", "epochs", "best_val_loss", "best_epoch", "val_study_kappa",
                "best_checkpoint", "wall_time_s", "arch", "lr", "dropout", "image_size"):
        assert col in trials.columns, col
    for col in ("trial_id", "epoch", "train_loss", "val_loss", "val_study_kappa", "val_auc"):
        assert col in epochs.columns, col
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    # The injected failure is a failed trial; the others ran.
    failed = trials[trials["status"] == "failed"]
    assert set(failed["lr"]) == {0.03} and len(failed) >= 1
    assert failed["error"].str.contains("injected failure").all()
    ok = trials[trials["status"] != "failed"]
    assert len(ok) >= 3
    # Checkpoints are stored relative to the experiment folder, so it can be moved.
    assert ok["best_checkpoint"].str.startswith("train-").all()
    assert ok["best_checkpoint"].map(lambda p: os.path.isdir(os.path.join(small_experiment, p))).all()
    # ASHA stopped at least one trial before max_epochs.
    assert (trials["status"] == "pruned").any(), trials[["trial_id", "status", "epochs"]]
    counts = epochs.groupby("trial_id").size()
    assert (counts.reindex(trials["trial_id"]).fillna(0).to_numpy() == trials["epochs"]).all()
    for name in ("search_space.yaml", "experiment.json", "manifest.parquet"):
        assert os.path.exists(os.path.join(small_experiment, name))
    # The files match the one schema module; the last epoch of every trial has its write time.
    # (another test may have written an ensemble into the shared experiment first: checked too)
    checked = assert_matches_schema(small_experiment)
    assert checked[:2] == ["trials.parquet", "epochs.parquet"]
    last = epochs.sort_values("epoch").groupby("trial_id").tail(1)
    assert last["checkpoint_write_s"].notna().all(), last
    assert not {"fail_at_epoch", "fail_mode"} & set(trials.columns)


@pytest.mark.slow
def test_optuna_is_told_what_asha_did(small_experiment):
    """The searcher state Ray saved: every trial ASHA stopped is PRUNED at the epoch it was
    stopped on, every finished one COMPLETE, each with one intermediate value per epoch."""
    import glob

    from optuna.trial import TrialState

    from raysearch.search.searcher import MultiFidelitySearch

    trials = pd.read_parquet(os.path.join(small_experiment, "trials.parquet"))
    epochs = pd.read_parquet(os.path.join(small_experiment, "epochs.parquet"))
    search = MultiFidelitySearch(metric="best_val_loss", mode="min", max_epochs=1)
    search.restore(max(glob.glob(os.path.join(small_experiment, "searcher-state-*.pkl"))))
    expected = {"completed": {TrialState.COMPLETE}, "early_stopped": {TrialState.COMPLETE},
                "pruned": {TrialState.PRUNED}, "failed": {TrialState.FAIL, TrialState.PRUNED}}
    for row in trials.itertuples():
        frozen = search._ot_study.trials[search._ot_trials[row.trial_id].number]
        assert frozen.state in expected[row.status], (row.trial_id, row.status, frozen.state)
        if frozen.state == TrialState.FAIL:
            continue
        reported = epochs.loc[epochs["trial_id"] == row.trial_id].set_index("epoch")
        reported = {int(e): v for e, v in reported["best_val_loss"].items()}
        # A stopped trial's worker may finish one more epoch (and checkpoint it) before the stop
        # reaches it; Tune never processes that result. Otherwise: every epoch, in order.
        steps = sorted(frozen.intermediate_values)
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 1
        assert row.epochs - len(steps) in ((0,) if row.status == "completed" else (0, 1))
        assert frozen.intermediate_values == pytest.approx({e: reported[e] for e in steps})
        assert frozen.value == pytest.approx(frozen.intermediate_values[steps[-1]])
    assert (trials["status"] == "pruned").any()


@pytest.mark.slow
def test_refuses_to_overwrite_a_different_experiment(small_experiment, small_space, tmp_path):
    from raysearch.search.tune import run_search

    changed = tmp_path / "changed.yaml"  # the same experiment, a wider dropout range
    with open(small_space) as f:
        changed.write_text(f.read().replace("uniform: [0.0, 0.3]", "uniform: [0.0, 0.5]"))
    with pytest.raises(ConfigError, match="already exists .* with a different search space"):
        run_search(load_search_space(str(changed)))
    # More trials would extend it; fewer than it already asked for cannot.
    with pytest.raises(ConfigError, match="num_samples: 5 is fewer than the 6 trials"):
        run_search(load_search_space(small_space, num_samples=5))


RESUME_SPACE = """
name: resume
data: {{root: {root}, val_fraction: 0.2, seed: 0}}
resources: {{workers_per_trial: 1, max_concurrent: 1, max_failures: 0}}
search: {{algorithm: tpe, seed: 0, num_samples: 2}}
scheduler: {{kind: fifo, max_epochs: 2, grace_period: 1}}
storage: {storage}
trial: {{weights: none, batch_size: 16, image_size: 32, arch: mobilenet_v3_small, augment: none}}
space:
  lr: {{loguniform: [0.001, 0.01]}}
"""


def _finished_runs(exp: str) -> list[str]:
    """Train runs whose latest checkpoint holds the final epoch."""
    import json

    done = []
    for run in sorted(os.listdir(exp)) if os.path.isdir(exp) else []:
        if not run.startswith("train-"):
            continue
        for ckpt in os.listdir(os.path.join(exp, run)):
            m = os.path.join(exp, run, ckpt, "metrics.json")
            if not os.path.exists(m):
                continue
            with open(m) as f:
                if json.load(f)["epoch"] == 2:
                    done.append(run)
                    break
    return done


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path, tiny_root):
    space = tmp_path / "resume.yaml"
    space.write_text(RESUME_SPACE.format(root=tiny_root, storage=tmp_path / "reports"))
    exp = str(tmp_path / "reports" / "resume")
    cmd = [sys.executable, "-m", "raysearch.cli", "tune", str(space)]
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(_finished_runs(exp)) < 1:
            time.sleep(1)
        assert _finished_runs(exp), "the first trial never finished"
        time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = time.time()
    first = _finished_runs(exp)[0].removeprefix("train-")
    assert not os.path.exists(os.path.join(exp, "trials.parquet"))

    out = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    trials = pd.read_parquet(os.path.join(exp, "trials.parquet"))
    epochs = pd.read_parquet(os.path.join(exp, "epochs.parquet"))
    assert len(trials) == 2 and (trials["status"] == "completed").all(), (
        trials[["trial_id", "status", "epochs", "error"]].to_string())
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    # The trial that had finished before the kill was kept, not re-run.
    killed = pd.Timestamp(killed_at, unit="s", tz="UTC")  # reported_at is a timestamp
    assert (epochs.loc[epochs.trial_id == first, "reported_at"] < killed).all()


def test_missing_weights_fail_before_ray_starts(tmp_path, monkeypatch, capsys):
    """`raysearch tune` with ImageNet weights offline: one clear line, exit 2, no Ray."""
    from urllib.error import URLError

    import torch

    from raysearch.cli import main
    from raysearch.models import weights as weights_mod
    from raysearch.search.tune import weight_sources

    assert ("densenet169", "imagenet") in weight_sources(load_search_space("search_spaces/mura.yaml"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(url, path):
        raise URLError("network is unreachable (test)")

    monkeypatch.setattr(weights_mod, "_download_url", no_network)
    from raysearch.data.roots import MURA_CSVS

    for name in MURA_CSVS:  # a data root that passes the checks made before the weights'
        (tmp_path / name).write_text("")
    space = tmp_path / "s.yaml"
    space.write_text(
        f"name: w\ndata: {{root: {tmp_path}}}\nstorage: {tmp_path / 'r'}\n"
        "trial: {weights: imagenet}\nspace: {arch: {choice: [resnet18]}}\n"
    )
    assert main(["tune", str(space)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "resnet18" in err and "weights fetch" in err


@pytest.mark.slow
def test_an_experiment_saved_by_an_earlier_release_resumes(tmp_path, tiny_root, ray_session):
    """tests/fixtures/saved-v0.2: a search of raysearch 0.2 (flat modules) killed right after
    Ray's first save: tuner.pkl, the searcher and experiment state pickle raysearch classes by
    their 0.2 module paths (raysearch.sampler, raysearch.results, raysearch.tune, ...). It must
    restore under the current layout and finish every trial."""
    import io

    import yaml
    from rich.console import Console

    from raysearch.search.space import parse_search_space
    from raysearch.search.tune import run_search

    fixture = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "saved-v0.2")
    exp = tmp_path / "store" / "saved-v0.2"
    shutil.copytree(fixture, exp)
    # The experiment moved, and so did its data: point the saved manifest at this session's copy
    # of the same synthetic dataset (seed 0, tiny).
    manifest = pd.read_parquet(exp / "manifest.parquet")
    saved_root = yaml.safe_load((exp / "search_space.yaml").read_text())["data"]["root"]
    manifest["image_path"] = manifest["image_path"].str.replace(saved_root, tiny_root, regex=False)
    assert manifest["image_path"].map(os.path.exists).all()
    manifest.to_parquet(exp / "manifest.parquet", index=False)

    raw = yaml.safe_load((exp / "search_space.yaml").read_text())
    raw["data"]["root"] = tiny_root
    raw["storage"] = str(tmp_path / "store")
    console = Console(file=io.StringIO(), width=120)
    run_search(parse_search_space(raw), console=console)

    trials = pd.read_parquet(exp / "trials.parquet")
    assert len(trials) == 2 and not trials["status"].isin(["failed", "unfinished"]).any(), trials
    # The trial Ray had saved as PENDING kept its id: the restored state was used, not a new one;
    # the second came from the restored searcher.
    assert "4be034ac" in set(trials["trial_id"])
    assert "resuming on the experiment's saved manifest" in console.file.getvalue()
