"""The checks before Ray: a wrong data root, a missing experiment or a trial too big for the
machine fails with one line and exit 2, before torch, Ray or pandas are imported (the reported
cases answered after 5 s to 6 minutes, once Ray had started). Also the shared resource check
(``cluster.check_worker_resources``) that ``train`` and ``tune`` both use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raysearch.cluster import check_worker_resources, local_resources
from raysearch.config import ResourcesConfig
from raysearch.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- resources


@pytest.mark.parametrize(
    "res, nodes, message",
    [
        ({"cpus_per_worker": 64}, [{"CPU": 2}],
         "resources.cpus_per_worker: 64 CPUs per worker, but this machine has 2 CPUs"),
        ({"cpus_per_worker": 3}, [{"CPU": 2}, {"CPU": 2}],
         ("resources.cpus_per_worker: 3 CPUs per worker, but this machine has 2 CPUs on its "
         "largest node")),
        ({"workers_per_trial": 3, "cpus_per_worker": 1}, [{"CPU": 2}],
         ("resources.workers_per_trial: 3 workers x 1 CPUs, but this machine has 2 CPUs (room "
         "for 2 such workers)")),
        # 1.5 CPUs on each of two 2-CPU nodes: one worker per node, not 4 / 1.5 = 2.67 of them
        ({"workers_per_trial": 3, "cpus_per_worker": 1.5}, [{"CPU": 2}, {"CPU": 2}],
         ("resources.workers_per_trial: 3 workers x 1.5 CPUs, but this machine has 4 CPUs (room "
         "for 2 such workers)")),
        ({"gpus_per_worker": 1}, [{"CPU": 8, "GPU": 0}],
         "resources.gpus_per_worker: 1 GPUs per worker, but this machine has 0 GPUs"),
        ({"workers_per_trial": 2, "gpus_per_worker": 1}, [{"CPU": 8, "GPU": 1}],
         "resources.workers_per_trial: 2 workers x 1 GPUs, but this machine has 1 GPUs"),
    ],
)
def test_a_trial_too_big_for_the_machine_is_refused(res, nodes, message):
    with pytest.raises(ConfigError) as info:
        check_worker_resources(ResourcesConfig(**res), nodes, where="this machine")
    assert str(info.value).startswith(message), str(info.value)


def test_trials_that_fit_pass_and_an_autoscaling_cluster_is_trusted_with_gpu_trials():
    fits = [({"workers_per_trial": 2, "cpus_per_worker": 1}, [{"CPU": 2}]),
            ({"workers_per_trial": 2, "cpus_per_worker": 2}, [{"CPU": 2}, {"CPU": 3}]),
            ({"gpus_per_worker": 0.5, "workers_per_trial": 2}, [{"CPU": 4, "GPU": 1}]),
            ({}, [{"CPU": 1}])]  # derived shares are planned later, from what there is
    for res, nodes in fits:
        check_worker_resources(ResourcesConfig(**res), nodes, where="this machine")
    # cluster.yaml's autoscaling cluster before any GPU worker is up: a 1-CPU head, no GPU.
    mura = ResourcesConfig(gpus_per_worker=1, cpus_per_worker=4)
    check_worker_resources(mura, [{"CPU": 1}], where="the cluster", may_grow=True)
    with pytest.raises(ConfigError, match="resources.gpus_per_worker: 1 GPUs per worker"):
        check_worker_resources(mura, [{"CPU": 8}], where="this machine")  # a machine: refused
    # A CPU-only trial is held to the nodes there are, as the resource plan holds it.
    with pytest.raises(ConfigError, match="resources.cpus_per_worker: 4 CPUs per worker, but the"):
        check_worker_resources(ResourcesConfig(cpus_per_worker=4), [{"CPU": 1}, {"CPU": 2}],
                               where="the cluster", may_grow=True)


def test_local_resources_count_what_ray_would(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    assert local_resources()["GPU"] == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local_resources()["GPU"] == 0
    monkeypatch.setenv("RAY_USE_MULTIPROCESSING_CPU_COUNT", "1")
    assert local_resources()["CPU"] == os.cpu_count()


# ----------------------------------------------------------------------------- the CLI, before Ray

# One interpreter runs every case (so the test costs one start-up), then says which heavy
# libraries any of them imported.
SCRIPT = r"""
import contextlib, io, json, sys
from raysearch.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    out.append([code, err.getvalue()])
heavy = sorted(m for m in ("torch", "torchvision", "ray", "pandas", "optuna") if m in sys.modules)
print(json.dumps({"results": out, "heavy": heavy}))
"""


def test_mistakes_known_before_ray_answer_without_torch_or_ray(tmp_path):
    from raysearch.data.roots import MURA_CSVS

    partial, full = tmp_path / "partial", tmp_path / "full"  # MURA CSVs: one, and all four
    (partial / "MURA-v1.1").mkdir(parents=True)
    (partial / "MURA-v1.1" / "train_image_paths.csv").write_text("")
    full.mkdir()
    for name in MURA_CSVS:
        (full / name).write_text("")
    big = tmp_path / "big.yaml"
    big.write_text(f"arch: resnet18\nweights: none\ndata: {{root: {full}}}\n"
                   "resources: {cpus_per_worker: 256}\n")
    big_space = tmp_path / "big_space.yaml"
    big_space.write_text(f"data: {{root: {full}}}\nresources: {{gpus_per_worker: 8}}\n"
                         "trial: {weights: none}\nspace: {lr: {choice: [0.001]}}\n")
    st = ["--storage", str(tmp_path / "st")]
    nofile = tmp_path / "no_weights.yaml"  # a weights file that is not there, in a search...
    nofile.write_text(f"data: {{root: {full}}}\ntrial: {{weights: /nonexistent/w.pt}}\n"
                      "space: {lr: {choice: [0.001]}}\n")
    point = tmp_path / "point.yaml"  # the README's old example: a start outside the choices
    point.write_text(f"data: {{root: {full}}}\nsearch: {{points_to_evaluate: [{{arch: densenet169}}]}}\n"
                     "space: {arch: {choice: [resnet18, mobilenet_v3_small]}}\n")
    nodemo = tmp_path / "no_demo_weights.yaml"  # ... and in one trial (the demo's stand-in)
    nodemo.write_text(f"arch: resnet18\nweights: demo_weights/resnet18.pt\ndata: {{root: {full}}}\n")
    afile = tmp_path / "results.csv"
    afile.write_text("a,b\n")
    exp = tmp_path / "runs" / "done"  # an experiment, as far as a path check can tell
    exp.mkdir(parents=True)
    (exp / "experiment.json").write_text('{"kind": "search", "name": "done"}')
    cases = [
        (["tune", "demo", "--data-root", "/nonexistent", *st],
         "raysearch: error: dataset folder does not exist: /nonexistent"),
        (["train", "demo_trial", "--data-root", "/nonexistent", *st],
         "raysearch: error: dataset folder does not exist: /nonexistent"),
        (["tune", "demo", "--data-root", str(partial), *st],
         f"raysearch: error: missing MURA CSV: {partial}/MURA-v1.1/train_labeled_studies.csv"),
        (["ensemble", "--experiment", "/nonexistent", *st],
         "raysearch: error: no experiment at /nonexistent (no experiment.json)"),
        (["train", str(big), *st],
         ("raysearch: error: resources.cpus_per_worker: 256 CPUs per worker, but this machine "
         "has")),
        (["tune", str(big_space), *st],
         "raysearch: error: resources.gpus_per_worker: 8 GPUs per worker, but this machine has 1"),
        (["tune", "demo", "--resume", "--data-root", str(full), *st],
         f"raysearch: error: --resume: no experiment to resume at {tmp_path}/st/demo"),
        (["weights", "fetch", "resnet9", "--to", str(tmp_path)],
         "raysearch: error: unknown arch 'resnet9'; allowed: densenet121"),
        # A file where a folder must be, a folder that is not there, an option out of range:
        # each refused at once, naming it.
        (["tune", "demo", "--data-root", str(full), "--storage", str(afile)],
         f"raysearch: error: storage: {afile} is a file, not a folder"),
        (["train", "demo_trial", "--data-root", str(full), "--storage", f"{afile}/runs"],
         f"raysearch: error: storage: {afile}/runs is under {afile}, which is a file"),
        (["list", str(tmp_path / "no-runs")],
         f"raysearch: error: storage folder {tmp_path}/no-runs does not exist"),
        (["data", str(full), "--val-fraction", "0"],
         "raysearch: error: data.val_fraction must be in (0, 1), got 0.0"),
        (["init", str(tmp_path / "no-dir" / "space.yaml")],
         f"raysearch: error: folder {tmp_path}/no-dir does not exist"),
        (["demo-data", str(partial), "--overwrite"],
         f"raysearch: error: {partial}/MURA-v1.1 was not made by raysearch demo-data"),
        (["serve", "--host", "not a host", "--ensemble", str(tmp_path)],
         "raysearch: error: --host 'not a host': not an address or a name that resolves"),
        (["serve", "--ensemble", str(tmp_path / "none")],
         f"raysearch: error: no such ensemble or experiment folder: {tmp_path}/none"),
        (["predict", str(afile), "--ensemble", str(full)],
         f"raysearch: error: {full} is neither an ensemble folder (members.parquet) nor an "),
        (["export", "--ensemble", str(tmp_path / "none"), "--format", "onnx"],
         f"raysearch: error: no such ensemble or experiment folder: {tmp_path}/none"),
        (["demo-data", f"{afile}/demo"],
         f"raysearch: error: not a folder (a file is in the way): {afile}/demo"),
        # Each bench's paths, before the bench imports torch (bench data and predict answered
        # after 2.4 s, once torch had loaded).
        *[(["bench", what, "--root", "/nonexistent"],
           "raysearch: error: dataset folder does not exist: /nonexistent")
          for what in ("data", "train", "search")],
        (["bench", "data", "--root", str(partial)],
         f"raysearch: error: missing MURA CSV: {partial}/MURA-v1.1/train_labeled_studies.csv"),
        (["bench", "search", "--space", str(tmp_path / "none.yaml")],
         f"raysearch: error: config file not found: {tmp_path}/none.yaml"),
        *[(["bench", what, "--ensemble", "/nonexistent"],
           "raysearch: error: no such ensemble or experiment folder: /nonexistent")
          for what in ("predict", "serve")],
        (["bench", "predict", "--storage", str(tmp_path / "st")],
         f"raysearch: error: no experiment under {tmp_path}/st"),
        # explain --audit with a data root that is not there made every map (minutes), found no
        # annotations there and wrote an audit of NaNs, exit 0
        (["explain", "--audit", "--data-root", "/nonexistent", *st],
         "raysearch: error: dataset folder does not exist: /nonexistent"),
        (["explain", str(afile), "--data-root", str(full), *st],
         "raysearch: error: --data-root applies to explain --audit only"),
        # Outputs that cannot be written, refused before the work (an ensemble was scored, a
        # report drawn, members exported, then "a file is in the way"), and --test-data's files.
        (["ensemble", "--experiment", str(exp), "--out", f"{afile}/x"],
         f"raysearch: error: --out: {afile}/x is under {afile}, which is a file, not a folder"),
        (["ensemble", "--experiment", str(exp), "--test-data", "/nonexistent"],
         "raysearch: error: dataset folder does not exist: /nonexistent"),
        (["report", "--experiment", str(exp), "--out", f"{afile}/r.html"],
         f"raysearch: error: --out {afile}/r.html: {afile} is a file, not a folder"),
        (["export", "--ensemble", str(exp), "--format", "onnx", "--out", f"{afile}/x"],
         f"raysearch: error: --out: {afile}/x is under {afile}, which is a file"),
        (["predict", str(full), "--ensemble", str(exp), "--out", str(afile)],
         f"raysearch: error: --out: {afile} is a file, not a folder"),
        (["explain", str(full), "--ensemble", str(exp), "--out", str(afile)],
         f"raysearch: error: --out: {afile} is a file, not a folder"),
        (["data", str(full), "--out", str(tmp_path)],
         f"raysearch: error: --out: {tmp_path} is a folder, not a file"),
        (["weights", "fetch", "resnet18", "--to", f"{afile}/w"],
         f"raysearch: error: --to: {afile}/w is under {afile}, which is a file"),
        (["weights", "stage-demo", "--to", str(afile)],
         f"raysearch: error: --to: {afile} is a file, not a folder"),
        # a starting point outside the space: it ended in `unexpected ValueError`, exit 1, inside Ray
        (["tune", str(point), *st],
         ("raysearch: error: search.points_to_evaluate[0].arch: 'densenet169' is not one of the "
          "choices ('resnet18', 'mobilenet_v3_small')")),
        # a weights file that is not there: after 5 s, once torch had loaded
        (["tune", str(nofile), *st],
         "raysearch: error: weights file not found: /nonexistent/w.pt (weights must be"),
        (["train", str(nodemo), *st],
         (f"raysearch: error: weights file not found: {tmp_path}/demo_weights/resnet18.pt; stage "
          "the demo's stand-in weights first: raysearch weights stage-demo --arch resnet18")),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps([argv for argv, _ in cases])],
        check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for (argv, message), (code, err) in zip(cases, report["results"]):
        assert code == 2 and err.count("\n") == 1 and err.startswith(message), (argv, err)
    assert report["heavy"] == [], f"validation imported {report['heavy']}"
