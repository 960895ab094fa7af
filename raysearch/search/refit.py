"""Search stage, k-fold refits: the N best configurations of a finished search, each retrained on
every fold of the training patients, for out-of-fold predictions (``raysearch refit``).

The search itself keeps one patient-level holdout (k-fold inside HPO multiplies its cost by k).
Afterwards:

* **Folds** (:func:`raysearch.data.split.patient_folds`): the patients of the ``train`` and ``val``
  splits in k patient-grouped folds, stratified by group x label, written once as
  ``folds.parquet`` in the experiment and reused by every later refit (``test`` is in no fold).
* **Refits**: for configuration c and fold f, one training run on the other folds' patients,
  validated on fold f's, for the trial's best epoch count E in the search (no early stopping: the
  held-out fold chooses nothing, so its predictions are honest out-of-fold predictions). Each run
  is a Ray Tune trial of a grid over the (c, f) pairs, with the search's resources and retries
  (``resources.max_failures``), the live view, and a stable run folder
  ``refit/refit-<trial>-f<f>``: a killed refit, run again, skips the finished pairs and resumes
  the others from their last checkpoints.
* **Outputs**: ``refit/oof_predictions.parquet`` (each training image exactly once per
  configuration), ``refit/refits.parquet`` (one row per pair) and, in ``trials.parquet``, the
  cross-validated mean and sd of val loss and study kappa per configuration
  (``cv_val_loss_mean``, ...). ``raysearch ensemble --oof`` selects on the out-of-fold
  predictions and bags each configuration's fold models on ``test``.

The out-of-fold protocol is AutoGluon's (Erickson et al. 2020, arXiv:2003.06505, sec. 3.3) and
nnU-Net's five-fold ensembling (Isensee et al., Nature Methods 2021).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import numpy as np
import pandas as pd

from raysearch.config import TrialConfig, check_seed
from raysearch.data.dataset import Task
from raysearch.errors import CheckpointError, ConfigError, DataError, SearchFailedError
from raysearch.experiment import (
    ExperimentLock,
    cache_dir,
    find_experiment,
    read_info,
    read_manifest,
    read_trials,
    relative,
)
from raysearch.experiment import schema as S
from raysearch.search.progress import LiveCallback
from raysearch.storage import atomic_write_parquet, exists, join, read_bytes, read_parquet

__all__ = ["REFIT_DIR", "fold_manifest", "load_folds", "refit_epochs", "run_refit"]

REFIT_DIR = "refit"


def refit_epochs(cfg: TrialConfig, best_epoch: int) -> int:
    """Epochs a refit of ``cfg`` trains: the trial's best epoch in the search (at least 1, and
    past a gradual trial's head-only epochs)."""
    epochs = max(1, int(best_epoch))
    if cfg.finetune == "gradual":
        epochs = max(epochs, cfg.warmup_epochs + 1)
    return epochs


DEFAULT_FOLDS = 5


def load_folds(exp_dir: str, manifest: pd.DataFrame, task: Task, *, k: int | None,
               seed: int | None, console=None) -> pd.DataFrame:
    """The experiment's ``folds.parquet`` (patient_id, fold), made and written on first use
    (``k`` folds, default 5, drawn with ``seed``, default 0; both recorded in
    ``experiment.json`` under ``folds``).

    An existing file is reused as it is, so every refit uses the same folds; ``k`` or ``seed``
    given and different from the saved ones, or a file that does not cover exactly the training
    patients (train and val splits), is a :class:`~raysearch.errors.ConfigError`.
    """
    from raysearch.data.split import patient_folds
    from raysearch.experiment import update_info

    training = manifest[manifest["split"].isin(["train", "val"])]
    patients = set(training["patient_id"].astype(str))
    uri = join(exp_dir, "folds.parquet")
    if exists(uri):
        folds = read_parquet(uri)
        folds["patient_id"] = folds["patient_id"].astype(str)
        n = int(folds["fold"].nunique())
        if k is not None and n != k:
            raise ConfigError(f"--folds {k}: this experiment's folds.parquet has {n} folds; "
                              f"use --folds {n} (or delete {uri} to make new folds)")
        saved_seed = (read_info(exp_dir).get("folds") or {}).get("seed")
        if seed is not None and saved_seed is not None and seed != saved_seed:
            raise ConfigError(f"--seed {seed}: this experiment's folds were drawn with seed "
                              f"{saved_seed}; use --seed {saved_seed} (or delete {uri} to make "
                              "new folds)")
        if set(folds["patient_id"]) != patients:
            raise ConfigError(f"{uri} does not cover this experiment's training patients; "
                              "delete it to make new folds")
        return folds
    k = DEFAULT_FOLDS if k is None else k
    seed = 0 if seed is None else seed
    folds = patient_folds(training.assign(patient_id=training["patient_id"].astype(str)), k=k,
                          seed=seed, group=task.group, label_columns=task.label_columns)
    S.write_parquet(folds, uri, S.FOLDS)
    update_info(exp_dir, folds={"k": k, "seed": seed})
    if console is not None:
        sizes = folds["fold"].value_counts().sort_index().tolist()
        console.print(f"folds: {len(folds)} training patients in {k} folds ({sizes} patients), "
                      f"stratified by {task.group} x label, seed {seed} -> {uri}")
    return folds


def fold_manifest(manifest: pd.DataFrame, folds: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The manifest of fold ``fold``'s refit: its patients are ``val``, the other training
    patients ``train``; ``test`` and the row order (so the decode-once caches) are unchanged."""
    out = manifest.copy()
    held = set(folds.loc[folds["fold"] == fold, "patient_id"].astype(str))
    training = out["split"].isin(["train", "val"])
    out.loc[training, "split"] = np.where(
        out.loc[training, "patient_id"].astype(str).isin(held), "val", "train")
    return out


def _final_checkpoint(run_dir: str, epochs: int) -> tuple[str, dict[str, Any]] | None:
    """The run's checkpoint of its final epoch, with its metrics, or None (not finished)."""
    from raysearch.experiment import run_checkpoints

    for uri, metrics in run_checkpoints(run_dir):
        if int(metrics.get("epoch", -1)) == epochs:
            return uri, metrics
    return None


def run_refit(
    *,
    experiment: str | None = None,
    storage: str = "reports",
    top: int = 2,
    folds: int | None = None,
    seed: int | None = None,
    address: str | None = None,
    verbose: bool = False,
    console=None,
) -> str:
    """``raysearch refit``: refit the ``top`` best configurations (lowest best val loss among the
    trials with a usable checkpoint) on ``folds`` patient-grouped folds drawn with ``seed``
    (None: the experiment's saved folds, else 5 folds and seed 0). Returns the refit folder's
    URI.

    Raises :class:`ConfigError` for ``top < 1``, ``folds < 2``, a seed outside [0, 2**32 - 1] or folds that disagree with the
    saved ones, :class:`CheckpointError` when the search has no usable trial,
    :class:`ExperimentLockedError` while another command writes the experiment, and
    :class:`SearchFailedError` when refits failed (the finished ones are kept: run it again).
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    if top < 1:
        raise ConfigError(f"--top must be >= 1, got {top}")
    if folds is not None and (not isinstance(folds, int) or folds < 2):
        raise ConfigError(f"--folds must be an integer >= 2, got {folds!r}")
    if seed is not None:  # numpy's RandomState takes < 2**32
        check_seed("--seed", seed)
    exp_dir = find_experiment(experiment, storage=storage)
    with ExperimentLock(exp_dir, command="refit"):
        return _run_refit(exp_dir, top=top, k=folds, seed=seed, address=address, verbose=verbose,
                          console=console)


def _run_refit(exp_dir, *, top, k, seed, address, verbose, console) -> str:
    from raysearch.experiment import read_trial_checkpoint

    info = read_info(exp_dir)
    task = Task.from_dict(info.get("task"))
    trials = read_trials(exp_dir)
    manifest = read_manifest(exp_dir)
    chosen = _usable(trials).head(top)
    if chosen.empty:
        raise CheckpointError(f"none of the {len(trials)} trials has a checkpoint to refit")
    if len(chosen) < top:
        console.print(f"[yellow]--top {top}: only {len(chosen)} trial(s) with a usable "
                      f"checkpoint; refitting {len(chosen)}[/]")
    fold_frame = load_folds(exp_dir, manifest, task, k=k, seed=seed, console=console)
    k = int(fold_frame["fold"].nunique())
    refit_dir = join(exp_dir, REFIT_DIR)

    # The fold manifests (same rows and order as the experiment's: the caches are shared).
    manifests = {}
    for f in range(k):
        uri = join(refit_dir, f"manifest_f{f}.parquet")
        atomic_write_parquet(fold_manifest(manifest, fold_frame, f), uri)
        manifests[f] = uri

    jobs: dict[str, dict[str, Any]] = {}
    for row in chosen.itertuples():
        saved = read_trial_checkpoint(str(row.trial_id), row.best_checkpoint, with_val=False)
        cfg = saved.config
        epochs = refit_epochs(cfg, int(row.best_epoch))
        cfg = dataclasses.replace(cfg, max_epochs=epochs, early_stop_patience=epochs,
                                  warmup_epochs=min(cfg.warmup_epochs, epochs))
        TrialConfig.from_dict(cfg.to_dict())  # still valid
        for f in range(k):
            name = f"refit-{row.trial_id}-f{f}"
            jobs[name] = {"trial_id": str(row.trial_id), "fold": f, "epochs": epochs,
                          "trial": cfg.to_dict(), "manifest": manifests[f],
                          "run_dir": join(refit_dir, name)}
    todo = [n for n, j in jobs.items() if _final_checkpoint(j["run_dir"], j["epochs"]) is None]
    done = len(jobs) - len(todo)
    console.print(
        f"[bold]refit[/]: {len(chosen)} configuration(s) x {k} folds = {len(jobs)} runs"
        + (f" ({done} finished earlier, {len(todo)} to run)" if done else "") + f" -> {refit_dir}"
    )
    t0 = time.time()
    if todo:
        _fit(exp_dir, info, {n: jobs[n] for n in todo}, address=address, verbose=verbose,
             console=console)
    return _collect(exp_dir, refit_dir, jobs, manifest, fold_frame, trials, task, k=k,
                    seconds=time.time() - t0, console=console)


def _usable(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials with a best checkpoint and a finite best val loss, lowest first (ties by id)."""
    has = trials["best_checkpoint"].map(lambda c: isinstance(c, str) and c != "").astype(bool)
    loss = pd.to_numeric(trials["best_val_loss"], errors="coerce")
    ok = trials[has & np.isfinite(loss)].assign(_loss=loss)
    return ok.sort_values(["_loss", "trial_id"], kind="stable").drop(columns="_loss")


def _saved_resources(exp_dir: str):
    """The search's resources (search_space.yaml), or one worker per run for `train` runs."""
    import yaml

    from raysearch.config import ResourcesConfig, build

    uri = join(exp_dir, "search_space.yaml")
    raw = yaml.safe_load(read_bytes(uri)) if exists(uri) else {}
    return build(ResourcesConfig, (raw or {}).get("resources") or {}, path="resources")


def _fit(exp_dir, info, jobs, *, address, verbose, console) -> None:
    """Run ``jobs`` as a Tune grid (one trial per (configuration, fold)), with the live view."""
    from raysearch.cluster import init_ray
    from raysearch.report.live import say_stage
    from raysearch.search.resources import plan_resources

    say_stage(console, "starting Ray")
    init_ray(address=address, verbose=verbose)
    import ray
    from ray import tune

    from raysearch.storage import ray_storage_args

    resources = _saved_resources(exp_dir)
    node_cpus = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    plan = plan_resources(resources, ray.cluster_resources(), node_cpus=node_cpus)
    run = {
        "jobs": jobs, "task": info.get("task") or {},
        "cache_dir": cache_dir(exp_dir, info), "workers": plan.workers,
        "gpus_per_worker": plan.gpus_per_worker, "cpus_per_worker": plan.cpus_per_worker,
        "torch_threads": plan.torch_threads,
    }
    from raysearch.search.resources import DRIVER_CPU
    from raysearch.train.trainer import driver_resources

    trainable = tune.with_resources(
        tune.with_parameters(refit_driver, run=run), driver_resources(run, driver_cpu=DRIVER_CPU))
    progress = RefitProgress(jobs, console=console)
    tuner = tune.Tuner(
        trainable,
        param_space={"job": tune.grid_search(sorted(jobs))},
        tune_config=tune.TuneConfig(max_concurrent_trials=plan.max_concurrent),
        run_config=tune.RunConfig(
            name=f"tune-{int(time.time())}", **ray_storage_args(join(exp_dir, REFIT_DIR)),
            failure_config=tune.FailureConfig(max_failures=resources.max_failures),
            callbacks=[progress], verbose=0,
        ),
    )
    with progress:
        progress.stage("starting refits")
        tuner.fit()


def refit_driver(config: dict[str, Any], *, run: dict[str, Any]) -> None:
    """The Tune trainable of one (configuration, fold) refit: its training loop in this process
    for one worker (:mod:`raysearch.train.inline`), a TorchTrainer for more, writing its
    checkpoints under its stable run folder so that a rerun resumes it."""
    from raysearch.train.inline import InlineSession, inline_enabled
    from raysearch.train.trainer import make_trainer
    from raysearch.train.worker import train_loop_per_worker

    job = run["jobs"][config["job"]]
    loop_config = {"trial": job["trial"], "task": run["task"], "manifest": job["manifest"],
                   "cache_dir": run["cache_dir"], "torch_threads": run["torch_threads"]}
    if inline_enabled(run["workers"]):
        train_loop_per_worker(loop_config, session=InlineSession(job["run_dir"]))
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    run_dir = job["run_dir"].rstrip("/")
    make_trainer(loop_config, run_name=run_dir.rsplit("/", 1)[-1],
                 storage=run_dir.rsplit("/", 1)[0], workers=run["workers"],
                 gpus_per_worker=run["gpus_per_worker"], cpus_per_worker=run["cpus_per_worker"],
                 callbacks=[TuneReportCallback()]).fit()


class RefitProgress(LiveCallback):
    """The live view of a refit (:class:`raysearch.report.live.LiveView`): one row per
    (configuration, fold) run, ``<trial>/f<fold>``, with its epochs against the planned ones."""

    def __init__(self, jobs: dict[str, dict[str, Any]], *, console) -> None:
        from raysearch.report.live import LiveView

        self.jobs = jobs
        self.console = console
        self.view = LiveView(num_trials=len(jobs), max_epochs=max(j["epochs"] for j in jobs.values()),
                             console=console)
        for name, job in jobs.items():
            self.view.add(self._id(name), self._config(job))

    @staticmethod
    def _id(name: str) -> str:
        return name.removeprefix("refit-").replace("-f", "/f")

    @staticmethod
    def _config(job) -> dict[str, Any]:
        t = job["trial"]
        return {"arch": t["arch"], "image_size": t["image_size"], "finetune": t.get("finetune"),
                "max_epochs": job["epochs"]}

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.view is not None:
            name = trial.config["job"]
            self.view.start(self._id(name), self._config(self.jobs[name]))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.view is not None:
            self.view.result(self._id(trial.config["job"]), result)

    def _end(self, trial, status: str) -> None:
        if self.view is None:
            return
        name = trial.config["job"]
        job = self.jobs[name]
        row = {"trial_id": self._id(name), "status": status, **self._config(job)}
        final = _final_checkpoint(job["run_dir"], job["epochs"])
        if final is not None:
            m = final[1]
            row.update(epochs=job["epochs"], best_val_loss=m.get("val_loss"),
                       best_epoch=job["epochs"], val_study_kappa=m.get("val_study_kappa"))
        self.view.end(row)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "completed")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "failed")


def _collect(exp_dir, refit_dir, jobs, manifest, fold_frame, trials, task, *, k, seconds,
             console) -> str:
    """Read every pair's final checkpoint, check out-of-fold coverage, write the outputs."""
    training = manifest[manifest["split"].isin(["train", "val"])]
    wanted = pd.Index(training["image_path"])
    rows, oof, missing = [], [], []
    for name, job in sorted(jobs.items()):
        final = _final_checkpoint(job["run_dir"], job["epochs"])
        if final is None:
            missing.append(f"{job['trial_id']} fold {job['fold']}")
            continue
        uri, metrics = final
        history = json.loads(read_bytes(join(uri, "history.json")))
        seconds = sum(float(h.get("epoch_time_s", 0)) + float(h.get("val_time_s", 0))
                      for h in history)
        rows.append({"trial_id": job["trial_id"], "fold": job["fold"], "epochs": job["epochs"],
                     "val_loss": float(metrics.get("val_loss", math.nan)),
                     "val_study_kappa": float(metrics.get("val_study_kappa", math.nan)),
                     "seconds": seconds, "checkpoint": relative(exp_dir, uri)})
        preds = read_parquet(join(uri, "val_predictions.parquet"))
        keep = ["image_path", *task.label_columns, *task.prob_columns]
        oof.append(preds[keep].assign(trial_id=job["trial_id"], fold=job["fold"]))
    if missing:
        raise SearchFailedError(
            f"refit: {len(missing)} of {len(jobs)} runs did not finish ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}); the finished ones are kept: run the same "
            "command again to finish the others")
    oof_frame = pd.concat(oof, ignore_index=True)
    oof_frame = oof_frame[["trial_id", "fold", "image_path", *task.label_columns,
                           *task.prob_columns]]
    # Out-of-fold coverage: every training image exactly once per configuration, held out by
    # the fold its patient is in.
    patient_fold = dict(zip(fold_frame["patient_id"].astype(str), fold_frame["fold"]))
    image_fold = dict(zip(training["image_path"],
                          training["patient_id"].astype(str).map(patient_fold)))
    for tid, sub in oof_frame.groupby("trial_id"):
        got = pd.Index(sub["image_path"])
        if got.has_duplicates or len(got) != len(wanted) or not got.isin(wanted).all():
            raise DataError(f"refit: the out-of-fold predictions of trial {tid} do not cover "
                            "the training images exactly once")
        if (sub["image_path"].map(image_fold) != sub["fold"]).any():
            raise DataError(f"refit: trial {tid} has predictions from a fold that trained on "
                            "the image's patient")
    refits = pd.DataFrame(rows)
    S.write_parquet(refits, join(refit_dir, "refits.parquet"), S.REFITS)
    S.write_parquet(oof_frame, join(refit_dir, "oof_predictions.parquet"), S.OOF_PREDICTIONS)

    # trials.parquet gains the cross-validated figures per configuration.
    cv = refits.groupby("trial_id").agg(
        cv_folds=("fold", "nunique"), cv_val_loss_mean=("val_loss", "mean"),
        cv_val_loss_sd=("val_loss", "std"), cv_val_study_kappa_mean=("val_study_kappa", "mean"),
        cv_val_study_kappa_sd=("val_study_kappa", "std"))
    raw = read_parquet(join(exp_dir, "trials.parquet"))
    raw = raw.drop(columns=[c for c in cv.columns if c in raw.columns])
    raw = raw.merge(cv, left_on=raw["trial_id"].astype(str), right_index=True, how="left")
    raw = raw.drop(columns=[c for c in raw.columns if c == "key_0"])
    S.write_parquet(raw, join(exp_dir, "trials.parquet"), S.TRIALS)
    _print_cv(trials, cv, k=k, seconds=seconds, refit_dir=refit_dir, console=console)
    return refit_dir


def _print_cv(trials, cv, *, k, seconds, refit_dir, console) -> None:
    from rich.table import Table

    table = Table(title=f"refit: {k}-fold cross-validation (out-of-fold val, mean ± sd over "
                  "folds) against the search's holdout val", title_justify="left")
    for col, justify in (("trial", "left"), ("arch", "left"), ("holdout val_loss", "right"),
                         ("cv val_loss", "right"), ("holdout kappa", "right"),
                         ("cv kappa", "right")):
        table.add_column(col, justify=justify)
    by_id = trials.set_index(trials["trial_id"].astype(str))
    for tid, r in cv.sort_values("cv_val_loss_mean").iterrows():
        t = by_id.loc[tid]
        table.add_row(
            tid, str(t.get("arch", "")), f"{t['best_val_loss']:.3f}",
            f"{r['cv_val_loss_mean']:.3f} ± {r['cv_val_loss_sd']:.3f}",
            f"{t.get('val_study_kappa', math.nan):.3f}",
            f"{r['cv_val_study_kappa_mean']:.3f} ± {r['cv_val_study_kappa_sd']:.3f}")
    console.print(table)
    console.print(f"refit done in {seconds:.0f} s; out-of-fold predictions: "
                  f"{join(refit_dir, 'oof_predictions.parquet')}; next: raysearch ensemble --oof")
