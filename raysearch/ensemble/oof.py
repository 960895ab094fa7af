"""Ensemble stage, out-of-fold selection (``raysearch ensemble --oof``): members chosen on the
out-of-fold predictions of ``raysearch refit`` (every training study, once per configuration)
instead of the val split (about a tenth of the training patients), then each chosen
configuration scored on ``test`` as the mean of its k fold models (bagging).

Selection by out-of-fold predictions is AutoGluon's (Erickson et al. 2020, arXiv:2003.06505),
Caruana et al.'s greedy forward selection (ICML 2004) run on them; averaging the fold models is
nnU-Net's (Isensee et al. 2021). ``test`` is still touched once, after selection.

The outputs are ``raysearch ensemble``'s (:mod:`raysearch.ensemble.run`), with these
differences: the selection set's rows have ``split == "oof"`` (not ``val``), and hold every
training image; the ``prob_<trial_id>`` columns are a configuration's bagged probability; and
``members.parquet`` lists each fold model as a member ``<trial_id>_f<fold>`` with weight
(configuration weight) / k, so that ``predict``, ``serve`` and ``export`` use the bag as it is.
``ensemble.json`` says ``"selection": "oof"`` and the number of folds.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from raysearch.data.dataset import Task
from raysearch.ensemble.members import image_keys, predict_split
from raysearch.errors import ConfigError, DataError
from raysearch.evaluation import metrics as M
from raysearch.experiment import cache_dir, read_trial_checkpoint, resolve
from raysearch.experiment import schema as S
from raysearch.storage import atomic_write_text, exists, join, read_parquet

__all__ = ["OOF_SPLIT", "oof_log_losses", "read_oof", "run_oof_ensemble"]

OOF_SPLIT = "oof"


def read_oof(exp_dir: str, manifest: pd.DataFrame, task: Task
             ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, np.ndarray]]:
    """``refit/refits.parquet``, the training images (manifest order, ``split`` set to
    ``oof``) and each refit configuration's out-of-fold probabilities ``[N, K]`` aligned to them.

    Raises :class:`ConfigError` when the experiment has no finished refit, and
    :class:`DataError` when a configuration's predictions do not cover the training images
    exactly once (a refit of another manifest)."""
    refits_uri = join(exp_dir, "refit", "refits.parquet")
    oof_uri = join(exp_dir, "refit", "oof_predictions.parquet")
    if not (exists(refits_uri) and exists(oof_uri)):
        raise ConfigError(f"--oof: {exp_dir} has no finished refit (refit/refits.parquet); run "
                          "`raysearch refit` first")
    refits = read_parquet(refits_uri)
    refits["trial_id"] = refits["trial_id"].astype(str)
    oof = read_parquet(oof_uri)
    oof["trial_id"] = oof["trial_id"].astype(str)
    training = manifest["split"].isin(["train", "val"])
    images = manifest.loc[training, image_keys(task)].reset_index(drop=True)
    images["split"] = OOF_SPLIT
    wanted = pd.Index(images["image_path"])
    probs = {}
    for tid, sub in oof.groupby("trial_id", sort=False):
        got = pd.Index(sub["image_path"])
        if got.has_duplicates or len(got) != len(wanted) or not got.isin(wanted).all():
            raise DataError(f"--oof: the out-of-fold predictions of trial {tid} do not cover "
                            "this experiment's training images exactly once; run refit again")
        aligned = sub.set_index("image_path").reindex(wanted)
        probs[str(tid)] = aligned[list(task.prob_columns)].to_numpy(np.float64)
    return refits, images, probs


def oof_log_losses(images: pd.DataFrame, probs: dict[str, np.ndarray], task: Task
                   ) -> dict[str, float]:
    """Each configuration's image-level log loss over the out-of-fold predictions, masked
    labels left out, averaged over labels (the objective the search minimised, on every
    training image)."""
    y = images[list(task.label_columns)].to_numpy(np.float64).reshape(len(images), task.k)
    out = {}
    for tid, p in probs.items():
        p = p.reshape(len(images), task.k)
        losses = [M.log_loss(y[~np.isnan(y[:, j]), j], p[~np.isnan(y[:, j]), j])
                  for j in range(task.k) if (~np.isnan(y[:, j])).any()]
        out[tid] = float(np.mean(losses)) if losses else math.nan
    return out


def run_oof_ensemble(exp_dir: str, out_dir: str, *, top: int, method: str, tta: bool,
                     n_boot: int, seed: int, console) -> str:
    """``raysearch ensemble --oof`` (see the module docstring). Returns the output folder."""
    from raysearch.ensemble.run import (
        _print_tables,
        _print_thresholds,
        _read_experiment,
        _warn_unfinished,
        category_table,
        ensemble_frames,
        prob_column,
        val_thresholds,
        worklist,
    )
    from raysearch.ensemble.selection import greedy_picks, selection_path
    from raysearch.inference.predictor import Predictor

    info, trials, manifest, task = _read_experiment(exp_dir)
    name = info.get("name") or exp_dir.rstrip("/").rsplit("/", 1)[-1]
    _warn_unfinished(name, info, trials, console=console)
    refits, oof_images, oof_probs = read_oof(exp_dir, manifest, task)
    losses = oof_log_losses(oof_images, oof_probs, task)
    k = int(refits["fold"].nunique())

    # --- select configurations on the out-of-fold predictions
    path: list[dict] = []
    if method == "top":
        ranked = sorted(oof_probs, key=lambda t: (losses[t], t))
        if len(ranked) < top:
            console.print(f"[yellow]--top {top} asks for more members than the {len(ranked)} "
                          f"refit configuration(s); using {len(ranked)}[/]")
        picks = {t: 1 for t in ranked[:top]}
        path = selection_path(oof_probs, oof_images, list(picks), task)
    else:
        picks = greedy_picks(oof_probs, oof_images, max_rounds=top, task=task, path=path)
    weights = {t: n / sum(picks.values()) for t, n in picks.items()}
    console.print(f"[bold]{name}[/]: {method} ensemble of {len(picks)} configuration(s) x {k} "
                  f"fold models, selected on the out-of-fold predictions of "
                  f"{oof_images['study_id'].nunique()} training studies")

    # --- every fold model of the chosen configurations, weight (config weight) / k
    folds = refits[refits["trial_id"].isin(picks)].sort_values(["trial_id", "fold"])
    members, member_weights, bag = [], [], {}
    for r in folds.itertuples():
        uri = resolve(exp_dir, r.checkpoint)
        fold_id = f"{r.trial_id}_f{int(r.fold)}"
        members.append(read_trial_checkpoint(fold_id, uri, with_val=False))
        n_folds = int((folds["trial_id"] == r.trial_id).sum())
        member_weights.append(weights[r.trial_id] / n_folds)
        bag.setdefault(r.trial_id, []).append(fold_id)
    predictor = Predictor(members, weights=member_weights, task=task)
    test_images, fold_probs = predict_split(
        predictor, manifest, task, split="test", cache_dir=cache_dir(exp_dir, info), tta=tta,
        console=console)
    test_probs = {t: np.mean([fold_probs[f] for f in ids], axis=0) for t, ids in bag.items()}

    # --- the tables, as `ensemble` writes them, with the out-of-fold set as the selection set
    splits = ("test", OOF_SPLIT)
    images, studies = ensemble_frames(
        {"test": (test_images, test_probs), OOF_SPLIT: (oof_images, {t: oof_probs[t]
                                                                    for t in picks})},
        weights, task)
    models = {"ensemble": "prob", **{t: prob_column(t) for t in picks}}
    metrics = category_table(images, studies, models=models, n_boot=n_boot, seed=seed, task=task,
                             splits=splits)
    cv = refits.groupby("trial_id").agg(val_loss=("val_loss", "mean"),
                                        kappa=("val_study_kappa", "mean"))
    rows = []
    for rank, (m, w) in enumerate(zip(members, member_weights), 1):
        tid, fold = m.trial_id.rsplit("_f", 1)
        fr = folds[(folds["trial_id"] == tid) & (folds["fold"] == int(fold))].iloc[0]
        rows.append({
            "rank": rank, "trial_id": m.trial_id, "weight": w, "picks": picks[tid],
            "best_val_loss": float(fr["val_loss"]), "best_epoch": int(fr["epochs"]),
            "status": "refit", "val_study_kappa": float(fr["val_study_kappa"]),
            "val_study_log_loss": math.nan, "best_checkpoint": m.checkpoint,
            **m.config.to_dict(),
        })
    members_df = pd.DataFrame(rows)
    thresholds = val_thresholds(studies, task, split=OOF_SPLIT)
    summary = {
        "experiment": exp_dir, "method": method, "top": top, "tta": tta, "n_boot": n_boot,
        "threshold": thresholds[task.labels[0]] if task.k == 1 else thresholds,
        "threshold_rule": "max Cohen's kappa on out-of-fold training studies",
        "selection": "oof", "folds": k, "selection_path": path,
        "seed": seed, "device": predictor.device.type, "weights": predictor.weights,
        "task": task.to_dict(), "n_test_studies": int(studies.loc[studies["split"] == "test",
                                                                   "study_id"].nunique()),
    }

    g = task.group
    S.write_parquet(members_df, join(out_dir, "members.parquet"), S.MEMBERS)
    S.write_parquet(studies, join(out_dir, "study_predictions.parquet"), S.STUDY_PREDICTIONS,
                    group=g)
    S.write_parquet(images, join(out_dir, "image_predictions.parquet"), S.IMAGE_PREDICTIONS,
                    group=g)
    S.write_parquet(metrics, join(out_dir, "category_metrics.parquet"), S.CATEGORY_METRICS,
                    group=g)
    atomic_write_text(join(out_dir, "worklist.csv"), worklist(studies, task).to_csv(index=False))
    atomic_write_text(join(out_dir, "ensemble.json"), json.dumps(summary, indent=1))
    best = min(picks, key=lambda t: (cv.loc[t, "val_loss"], t))
    shown = members_df.assign(trial_id=members_df["trial_id"])
    _print_tables(name, shown, metrics, task, console=console, best=best, selection=OOF_SPLIT)
    _print_thresholds(studies, thresholds, task, console=console, selection="out-of-fold studies")
    console.print(f"results: {out_dir} (selection: out-of-fold, {k} folds)")
    return out_dir
