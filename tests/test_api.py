"""Tests for the Python API (raysearch.api): an experiment opened from a folder, a name or a URL,
its tables, best trial and checkpoint, its ensemble and a predictor; `raysearch.ensemble(...)`
returns the ensemble it wrote; `import raysearch` stays light. `raysearch.tune(...)` is run end to
end in tests/search/test_extend.py."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

import raysearch
from raysearch.data.mura import MURA_TASK
from raysearch.errors import ConfigError, ExperimentStateError
from raysearch.experiment import TrialCheckpoint, update_info, write_results
from raysearch.inference import Predictor
from raysearch.storage import atomic_write_parquet, atomic_write_text, join
from tests.inference.test_predictor import _checkpoint


def make_search(root: str, name: str = "exp") -> str:
    """A finished search with two trials (mobilenet 48 px, resnet18 32 px) and an ensemble of
    both weighted 0.75/0.25, laid out as `raysearch tune` and `raysearch ensemble` leave it."""
    exp = join(root, name)
    _checkpoint(os.path.join(exp, "train-a", "checkpoint_000001"), seed=0, image_size=48)
    _checkpoint(os.path.join(exp, "train-b", "checkpoint_000002"), seed=1, image_size=32,
                arch="resnet18")
    update_info(exp, kind="search", name=name, state="finished", trials=2, num_samples=2,
                task=MURA_TASK.to_dict())
    trials = pd.DataFrame({
        "trial_id": ["b", "a"], "status": ["completed", "pruned"], "epochs": [3, 1],
        "best_val_loss": [0.30, 0.45], "best_epoch": [3, 1], "val_study_kappa": [0.6, 0.2],
        "best_checkpoint": ["train-b/checkpoint_000002", "train-a/checkpoint_000001"],
        "wall_time_s": [9.0, 3.0], "error": [None, None], "arch": ["resnet18", "mobilenet_v3_small"],
    })
    epochs = pd.DataFrame({"trial_id": ["a", "b", "b", "b"], "epoch": [1, 1, 2, 3],
                           "val_loss": [0.45, 0.5, 0.4, 0.3]})
    write_results(exp, trials, epochs)
    ens = join(exp, "ensemble")
    atomic_write_parquet(pd.DataFrame({
        "rank": [1, 2], "trial_id": ["b", "a"], "weight": [0.75, 0.25],
        "checkpoint": ["train-b/checkpoint_000002", "train-a/checkpoint_000001"],
    }), join(ens, "members.parquet"))
    atomic_write_parquet(pd.DataFrame({
        "model": ["ensemble", "ensemble", "b"], "split": ["test", "val", "test"],
        "body_part": ["ALL"] * 3, "kappa": [0.7, 0.8, 0.6],
    }), join(ens, "category_metrics.parquet"))
    atomic_write_text(join(ens, "ensemble.json"), json.dumps({"method": "top", "top": 2}))
    return exp


def test_import_raysearch_imports_neither_torch_nor_ray():
    code = ("import sys, raysearch; raysearch.open_experiment; raysearch.Experiment; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.stdout.strip() == "[]"


def test_open_experiment_gives_tables_best_trial_and_checkpoint(tmp_path):
    exp_dir = make_search(str(tmp_path / "reports"))
    for ref in (exp_dir, "exp"):  # a folder, or a name under storage
        exp = raysearch.open_experiment(ref, storage=str(tmp_path / "reports"))
        assert isinstance(exp, raysearch.Experiment) and exp.path == exp_dir
    assert (exp.name, exp.kind, exp.state) == ("exp", "search", "finished")
    assert isinstance(exp.trials, pd.DataFrame) and list(exp.trials["trial_id"]) == ["b", "a"]
    assert exp.trials["best_checkpoint"].str.startswith(exp_dir).all()  # full URIs
    assert len(exp.epochs) == 4 and set(exp.epochs["trial_id"]) == {"a", "b"}
    assert exp.best_trial["trial_id"] == "b"
    best = exp.best_checkpoint
    assert isinstance(best, TrialCheckpoint)
    assert best.checkpoint == join(exp_dir, "train-b", "checkpoint_000002")
    assert (best.config.arch, best.config.image_size) == ("resnet18", 32)
    assert exp.status().by_status == {"completed": 1, "pruned": 1}
    assert "Experiment('exp', kind='search', state='finished'" in repr(exp)


def test_the_ensemble_and_predictors_of_an_experiment(tmp_path):
    exp = raysearch.open_experiment(make_search(str(tmp_path)))
    ens = exp.ensemble
    assert isinstance(ens, raysearch.Ensemble)
    assert ens.weights == {"b": 0.75, "a": 0.25}
    assert list(ens.members["best_checkpoint"]) == [
        join(exp.path, "train-b", "checkpoint_000002"), join(exp.path, "train-a", "checkpoint_000001")]
    assert ens.test_metrics["kappa"].tolist() == [0.7]
    assert ens.summary["method"] == "top"

    predictor = exp.predictor(device="cpu")  # the ensemble, with its weights
    assert isinstance(predictor, Predictor)
    assert predictor.weights == {"b": 0.75, "a": 0.25}
    best = exp.predictor(top=1, device="cpu")  # the best trial alone
    assert [m.trial_id for m in best.members] == ["b"]
    image = np.random.default_rng(0).integers(0, 255, (40, 30), dtype=np.uint8)
    both = predictor.predict([image])
    np.testing.assert_allclose(both.probs, 0.75 * both.members["b"] + 0.25 * both.members["a"],
                               atol=1e-7)
    np.testing.assert_allclose(best.predict([image]).probs, both.members["b"], atol=1e-6)


def test_an_experiment_without_ensemble_or_checkpoint(tmp_path):
    exp_dir = join(str(tmp_path), "bare")
    update_info(exp_dir, kind="search", name="bare", state="failed")
    write_results(exp_dir, pd.DataFrame({
        "trial_id": ["x"], "status": ["failed"], "best_val_loss": [float("nan")],
        "best_checkpoint": [None]}), pd.DataFrame())
    exp = raysearch.open_experiment(exp_dir)
    assert exp.ensemble is None and exp.state == "failed"
    with pytest.raises(ExperimentStateError, match="no trial with a checkpoint"):
        _ = exp.best_trial


def test_open_experiment_names_what_exists_when_there_is_none(tmp_path):
    make_search(str(tmp_path), "real")
    with pytest.raises(ConfigError, match="no experiment at .*nope.*experiments under .*: real"):
        raysearch.open_experiment("nope", storage=str(tmp_path))


def test_raysearch_ensemble_returns_the_ensemble_it_wrote(tmp_path, tiny_root):
    """`raysearch.ensemble(...)`, as `raysearch ensemble` but returning an Ensemble."""
    from raysearch.data.mura import read_mura
    from tests.ensemble.test_ensemble import make_experiment, model_bytes

    manifest = read_mura(tiny_root, val_fraction=0.3, seed=0)
    exp_dir = make_experiment(str(tmp_path), "e", manifest, model_bytes.__wrapped__(),
                              cache_dir=str(tmp_path / "cache"))
    ens = raysearch.ensemble(raysearch.open_experiment(exp_dir), top=2, n_boot=20,
                             console=Console(file=io.StringIO()))
    assert isinstance(ens, raysearch.Ensemble) and ens.path == join(exp_dir, "ensemble")
    assert list(ens.weights) == ["t_b", "t_d"] and sum(ens.weights.values()) == pytest.approx(1)
    assert ens.summary["top"] == 2 and set(ens.test_metrics["body_part"]) >= {"ALL"}
    assert raysearch.open_experiment(exp_dir).ensemble.weights == ens.weights


def _readme_python_session() -> list[tuple[str, str]]:
    """(statement, output shown) pairs of the ``>>>`` session under README's `## The Python API`."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## The Python API\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    pairs: list[tuple[str, str]] = []
    for line in block.splitlines():
        if line.startswith(">>> "):
            pairs.append((line[4:], ""))
        elif pairs:
            pairs[-1] = (pairs[-1][0], pairs[-1][1] + line + "\n")
    return pairs


def _kinds(text: str) -> set[str]:
    """The class names a repr shows (``Experiment(...)``, ``array([...])``): what a run's output
    has in common with the README's, whose ids, paths and numbers are its own run's."""
    import re

    return set(re.findall(r"\b([A-Za-z_]\w*)\(", text))


def test_the_readme_python_api_session_runs(tmp_path, tiny_root, monkeypatch):
    """Every statement of the README's Python API example runs, in order, in a folder laid out
    as the example's (runs/tiny with an ensemble, demo/ with the demo data, the ensemble
    exported to ONNX by the README's export command); each result has the README's shape: the
    same classes in its repr, the same table header."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from raysearch.cli import main

    monkeypatch.chdir(tmp_path)
    exp_dir = make_search(str(tmp_path / "runs"), "tiny")
    # the example's columns: lr in trials, the losses and kappa in epochs
    trials = pd.read_parquet(join(exp_dir, "trials.parquet")).assign(lr=[1e-3, 3e-3])
    trials["best_checkpoint"] = ["train-b/checkpoint_000002", "train-a/checkpoint_000001"]
    epochs = pd.DataFrame({"trial_id": ["a", "b", "b", "b"], "epoch": [1, 1, 2, 3],
                           "train_loss": [0.5, 0.6, 0.5, 0.4], "val_loss": [0.45, 0.5, 0.4, 0.3],
                           "val_study_kappa": [0.2, 0.3, 0.5, 0.6]})
    write_results(exp_dir, trials, epochs)
    os.symlink(tiny_root, tmp_path / "demo")
    assert main(["export", "--ensemble", "runs/tiny/ensemble", "--format", "onnx"]) == 0

    session = _readme_python_session()
    assert len(session) >= 10, session
    namespace: dict = {}
    for statement, shown in session:
        try:
            code = compile(statement, "README.md", "eval")
        except SyntaxError:
            exec(compile(statement, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
            assert not shown.strip(), (statement, shown)
            continue
        result = eval(code, namespace)  # the README's own code
        if not shown.strip():
            continue
        text = repr(result)
        if isinstance(result, pd.DataFrame):  # the header: the columns the example selects
            assert text.splitlines()[0].split() == shown.splitlines()[0].split(), (statement, text)
        else:
            assert _kinds(text) == _kinds(shown), (statement, text, shown)
    assert namespace["images"], "the example's glob found no demo images to predict"
