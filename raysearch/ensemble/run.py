"""Ensemble stage: members chosen on val (:mod:`raysearch.ensemble.selection`), scored on test, by study.

``run_ensemble`` reads a finished search (``raysearch tune``): ``experiment.json``,
``trials.parquet``, the manifest and each trial's best checkpoint. Members are *selected* on the
val probabilities saved in the checkpoints (no re-inference, nnU-Net style), then *scored* by
running each member on the ``test`` split (MURA's official validation set), which played no part
in training, early stopping or selection. The val metrics are reported too, labelled
``split == "val"``: they are the selection set and therefore optimistic.

An ensemble's image probability is the weighted mean of its members' (top-k: equal weights;
greedy: how often each member was picked), computed by the predictor
(:class:`raysearch.inference.Predictor`), as on new studies. A study's probability aggregates its
images' by the task's rule (MURA: the mean), and the study is positive when it is > 0.5.

The tables below are MURA's (K = 1 label). For a task of K > 1 labels every prediction and metric
row is per (image or study, label): a ``label_name`` column follows ``study_id``, ``label`` is
that label's target, and masked labels have no row. ``<group>`` is the task's group column
(MURA: ``body_part``).

Outputs, under ``<experiment>/ensemble/`` or ``out`` (every file written atomically, after
everything has been computed, so a failure leaves no partial file behind)::

    members.parquet            rank, trial_id, weight, picks, best_val_loss, best_epoch, status,
                               val_study_kappa, val_study_log_loss, best_checkpoint, then every
                               TrialConfig field (from the checkpoint's trial.json)
    study_predictions.parquet  study_id, patient_id, body_part, split, label, n_images,
                               prob, pred (the ensemble), prob_<trial_id> per member
    image_predictions.parquet  image_path, study_id, patient_id, body_part, split, label,
                               prob, pred, prob_<trial_id> per member
    category_metrics.parquet   model (``ensemble`` or a trial id), split (``test`` | ``val``),
                               body_part (the 7 parts, then ``ALL``), n_studies, accuracy,
                               kappa, kappa_low, kappa_high, sensitivity, specificity, auc,
                               tp, fp, tn, fn, image_auc
    worklist.csv               the test studies, most likely abnormal first: rank, study_id,
                               patient_id, body_part, prob, pred, label (K > 1: the columns
                               of worklist.parquet)
    label_metrics.parquet      per model (ensemble, best single member), split, label_name and
                               group: ROC AUC and average precision with patient-bootstrap
                               95% intervals (raysearch.evaluation.labels)
    threshold_metrics.parquet  the same cells: precision, recall, F1 (with intervals) at 0.4,
                               0.5, 0.6, 0.7, 0.8 and at the val-chosen threshold for the
                               target sensitivity (``rule == "val_sensitivity"``)
    worklist.parquet           the test studies by P(any finding) (raysearch.evaluation.triage)
    triage.parquet             abnormal studies found in the first 10/20/50% of that list
                               against a random order, with intervals
    cross_dataset.parquet      with ``test_data``: per label, the ensemble's AUC and AP on its
                               own test split and on the other dataset, side by side, through
                               the label mapping (raysearch.evaluation.crossdataset)
    ensemble.json              the settings of the run and the member weights (written last)

Every column's type, and ensemble.json's keys, are in :mod:`raysearch.experiment.schema`
(rendered in docs/SCHEMAS.md); the files are written through it.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import numpy as np
import pandas as pd

from raysearch.config import check_seed
from raysearch.data.dataset import Task
from raysearch.ensemble.members import (
    Member,
    align_val,
    load_member,
    predict_split,
    stack_labels,
)
from raysearch.ensemble.selection import (
    greedy_picks,
    label_mean_log_losses,
    none_usable,
    select_top,
    selection_path,
    study_matrix,
    usable_trials,
)
from raysearch.errors import CheckpointError, ConfigError
from raysearch.evaluation import crossdataset as X
from raysearch.evaluation import labels as L
from raysearch.evaluation import metrics as M
from raysearch.evaluation import triage as T
from raysearch.experiment import (
    ExperimentLock,
    cache_dir,
    find_experiment,
    read_info,
    read_manifest,
    read_trials,
)
from raysearch.experiment import schema as S
from raysearch.experiment.schema import write_parquet
from raysearch.storage import atomic_write_text, join

__all__ = ["METRIC_COLUMNS", "category_table", "ensemble_frames", "run_ensemble", "select_members", "worklist"]

METHODS = ("top", "greedy")
SPLITS = ("test", "val")  # the honest estimate first, then the selection set
# category_metrics.parquet for MURA (K = 1); with several labels ``label_name`` follows ``split``.
METRIC_COLUMNS = ["model", "split", *M.CATEGORY_COLUMNS, "image_auc"]


# ----------------------------------------------------------------------------- finding things


def _read_experiment(exp_dir: str) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame, Task]:
    """experiment.json, trials.parquet (checkpoints resolved), the manifest and the task."""
    info = read_info(exp_dir)
    return info, read_trials(exp_dir), read_manifest(exp_dir), Task.from_dict(info.get("task"))


# ----------------------------------------------------------------------------- evaluation


def prob_column(trial_id: str) -> str:
    return f"prob_{trial_id}"


def ensemble_frames(
    parts: dict[str, tuple[pd.DataFrame, dict[str, np.ndarray]]],
    weights: dict[str, float],
    task: Task | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Image and study predictions for every split: ensemble ``prob``/``pred`` and one
    ``prob_<trial_id>`` column per member; one row per (image or study, known label), with a
    ``label_name`` column when the task has several labels."""
    task = task or Task.from_dict(None)
    total = sum(weights.values())
    frames = []
    for split, (images, probs) in parts.items():
        ens = sum((w / total) * np.asarray(probs[t], np.float64).reshape(len(images), task.k)
                  for t, w in weights.items())
        stacked = stack_labels(
            images.assign(split=split),
            {"prob": ens, **{prob_column(t): probs[t] for t in weights}}, task,
        )
        stacked.insert(stacked.columns.get_loc("prob") + 1, "pred",
                       M.predict(stacked["prob"], threshold=task.threshold))
        frames.append(stacked)
    images = pd.concat(frames, ignore_index=True)
    cols = ["prob", *[prob_column(t) for t in weights]]
    studies = M.aggregate_studies(images, prob_cols=cols, group=task.group,
                                  rule=task.aggregation, keys=["label_name"])
    studies.insert(studies.columns.get_loc("prob") + 1, "pred",
                   M.predict(studies["prob"], threshold=task.threshold))
    if task.k == 1:  # one label: the tables keep MURA's documented columns
        images, studies = images.drop(columns="label_name"), studies.drop(columns="label_name")
    return images, studies


def category_table(
    images: pd.DataFrame,
    studies: pd.DataFrame,
    *,
    models: dict[str, str],
    n_boot: int,
    seed: int,
    task: Task | None = None,
    splits: tuple[str, ...] = SPLITS,
) -> pd.DataFrame:
    """``category_metrics`` for every model (name -> probability column), split (``splits``:
    test then the selection set, val or oof) and label, plus the image-level AUC. The same
    bootstrap seed for every row keeps models comparable."""
    task = task or Task.from_dict(None)
    by_label = "label_name" in studies.columns
    rows = []
    for split in splits:
        for label in task.labels:
            st = studies[studies["split"] == split]
            im = images[images["split"] == split]
            if by_label:
                st, im = st[st["label_name"] == label], im[im["label_name"] == label]
            if st.empty:
                continue
            for model, col in models.items():
                cm = _all_groups(M.category_metrics(
                    st, prob_col=col, group=task.group, n_boot=n_boot, seed=seed,
                    threshold=task.threshold,
                ), task)
                cm["image_auc"] = [
                    M.roc_auc(sub["label"], sub[col])
                    for sub in (im if g == M.ALL else im[im[task.group] == g] for g in cm[task.group])
                ]
                cm.insert(0, "split", split)
                cm.insert(0, "model", model)
                if by_label:
                    cm.insert(2, "label_name", label)
                rows.append(cm)
    return pd.concat(rows, ignore_index=True)


def _all_groups(cm: pd.DataFrame, task: Task) -> pd.DataFrame:
    """Every known group gets a row, so the schema does not depend on the data: a group without
    studies has n_studies = 0, zero counts and nan metrics."""
    known = list(task.groups)
    groups = [*known, *sorted(set(cm[task.group]) - {*known, M.ALL}), M.ALL]
    out = cm.set_index(task.group).reindex(groups).reset_index()
    for col in ("n_studies", "tp", "fp", "tn", "fn"):
        out[col] = out[col].fillna(0).astype(np.int64)
    return out


def worklist(studies: pd.DataFrame, task: Task | None = None) -> pd.DataFrame:
    """Test studies from most to least likely positive (ties by study id): the triage order.
    With several labels a study ranks by its most likely label (``label_name``)."""
    task = task or Task.from_dict(None)
    test = studies[studies["split"] == "test"]
    if "label_name" in test.columns:  # several labels: a study's most likely finding
        test = test.sort_values(["study_id", "prob"], ascending=[True, False], kind="stable")
        test = test.drop_duplicates("study_id")
    test = test.sort_values(["prob", "study_id"], ascending=[False, True], kind="stable")
    cols = ["study_id", "patient_id", task.group,
            *(["label_name"] if "label_name" in test.columns else []), "prob", "pred", "label"]
    out = test[cols].reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out


def label_tables(
    studies: pd.DataFrame, *, models: dict[str, str], task: Task, n_boot: int, seed: int,
    target_sensitivity: float = L.TARGET_SENSITIVITY,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """label_metrics.parquet and threshold_metrics.parquet: :func:`raysearch.evaluation.labels.
    label_metrics` for every model (name -> probability column) on test and on val. Each model's
    val_sensitivity threshold per label is chosen on its own val studies
    (:func:`~raysearch.evaluation.labels.sensitivity_threshold`) and applied unchanged to test."""
    st = studies if "label_name" in studies.columns else studies.assign(label_name=task.labels[0])
    ranking, at = [], []
    for model, col in models.items():
        val = st[st["split"] == "val"]
        chosen = {label: L.sensitivity_threshold(sub["label"], sub[col], target=target_sensitivity)
                  for label, sub in val.groupby("label_name", sort=False)}
        for split in SPLITS:
            sub = st[st["split"] == split]
            if sub.empty:
                continue
            r, a = L.label_metrics(sub, prob_col=col, group=task.group, groups=task.groups,
                                   chosen=chosen, n_boot=n_boot, seed=seed)
            for frame in (r, a):
                frame.insert(0, "split", split)
                frame.insert(0, "model", model)
            ranking.append(r)
            at.append(a)
    return pd.concat(ranking, ignore_index=True), pd.concat(at, ignore_index=True)


def triage_frames(
    studies: pd.DataFrame, task: Task, *, rule: str, n_boot: int, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """worklist.parquet and triage.parquet for the ensemble's test studies, and the rule used
    (:mod:`raysearch.evaluation.triage`)."""
    test = studies[studies["split"] == "test"]
    work, used = T.worklist(test, group=task.group, prob_col="prob", rule=rule)
    return work, T.triage_table(work, n_boot=n_boot, seed=seed), used


def read_other_dataset(root: str, fmt: str | None, *, console=None) -> tuple[pd.DataFrame, Task]:
    """The other dataset of the cross-dataset test, read by its reader
    (:func:`raysearch.data.prepare.read_dataset`, ``data.format`` = ``fmt``)."""
    from raysearch.config import DataConfig
    from raysearch.data.prepare import read_dataset

    try:
        data = DataConfig(root=root, **({"format": fmt} if fmt else {}))
    except TypeError as e:  # a DataConfig without `format`: a build without the other readers
        raise ConfigError(f"--format {fmt}: this build reads only MURA (no data.format)") from e
    return read_dataset(data, console=console)


def _format_of(info: dict[str, Any], task: Task) -> str:
    """The experiment's dataset format: data.format as saved, else the task's name."""
    fmt = (info.get("data") or {}).get("format")
    return str(fmt if fmt and fmt != "auto" else task.name).lower()


def cross_dataset(
    predictor, *, home_task: Task, home_format: str, home_metrics: pd.DataFrame,
    other_manifest: pd.DataFrame, other_task: Task, other_format: str, cache_dir: str,
    tta: bool, n_boot: int, seed: int, console=None,
) -> tuple[pd.DataFrame, X.LabelMapping]:
    """The ensemble of ``predictor`` scored on another dataset: every image of
    ``other_manifest`` (none was seen in training, early stopping or selection), its
    probabilities mapped to the other task's labels (:func:`raysearch.evaluation.crossdataset.
    map_labels`: the explicit mapping between the two formats, else equal names), studies
    aggregated by the other task's rule, AUC and AP per shared label with patient-bootstrap
    intervals, side by side with ``home_metrics`` (label_metrics.parquet rows of the
    ensemble on test). Returns the table and the mapping."""
    mapping = X.map_labels(home_task.labels, other_task.labels,
                           X.mapping_for(home_format, other_format))
    # A reader's notes in .attrs (MURA: skipped files, as DataFrames) would make pandas compare
    # them on every concat (and fail: a DataFrame has no truth value); the scores need none.
    other_manifest = other_manifest.copy()
    other_manifest.attrs = {}
    if console is not None:
        console.print(
            f"cross-dataset test on {other_format} ({len(other_manifest)} images): "
            f"{len(mapping.shared)} shared label(s)"
            + (f"; not shared: {', '.join([*mapping.home_only, *mapping.other_only])}"
               if mapping.home_only or mapping.other_only else "")
        )
    if not mapping.shared:
        other_rank = pd.DataFrame(columns=["label_name", other_task.group, *L.RANKING_COLUMNS])
    else:
        images, probs = predict_split(predictor, other_manifest.assign(split="external"),
                                      other_task, split="external", cache_dir=cache_dir, tta=tta,
                                      console=console)
        ens = sum(predictor.weights[t] * np.asarray(p, np.float64).reshape(len(images),
                                                                           home_task.k)
                  for t, p in probs.items())
        stacked = X.stack_mapped(images, ens, home_labels=home_task.labels,
                                 other_columns=dict(zip(other_task.labels,
                                                        other_task.label_columns)),
                                 mapping=mapping)
        studies = M.aggregate_studies(stacked, prob_cols=["prob"], group=other_task.group,
                                      rule=other_task.aggregation, keys=["label_name"])
        other_rank = L.ranking_metrics(studies, group=other_task.group,
                                       groups=other_task.groups, n_boot=n_boot, seed=seed)
    home = home_metrics[(home_metrics["model"] == "ensemble") & (home_metrics["split"] == "test")]
    table = X.side_by_side(home, other_rank, mapping, home_group=home_task.group,
                           other_group=other_task.group)
    table.insert(0, "other_format", other_format)
    return table, mapping


def members_frame(
    members: list[Member],
    weights: dict[str, float],
    trials: pd.DataFrame,
    *,
    val_images: pd.DataFrame,
    val_probs: dict[str, np.ndarray],
    picks: dict[str, int],
    task: Task,
) -> pd.DataFrame:
    by_id = trials.set_index("trial_id")
    labels, S, names = study_matrix(val_images, [val_probs[m.trial_id] for m in members], task,
                                    with_label_names=True)
    study_losses = label_mean_log_losses(labels, S, names)
    rows = []
    for rank, (m, loss) in enumerate(zip(members, study_losses), 1):
        t = by_id.loc[m.trial_id]
        rows.append({
            "rank": rank,
            "trial_id": m.trial_id,
            "weight": weights[m.trial_id],
            "picks": picks[m.trial_id],
            "best_val_loss": float(t["best_val_loss"]),
            "best_epoch": int(t["best_epoch"]) if pd.notna(t.get("best_epoch")) else None,
            "status": str(t["status"]) if "status" in t else None,
            "val_study_kappa": float(t["val_study_kappa"]) if "val_study_kappa" in t else math.nan,
            "val_study_log_loss": float(loss),
            "best_checkpoint": m.checkpoint,
            **m.config.to_dict(),
        })
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the command


def _top_shortfall(top: int, n_usable: int, n_trials: int) -> str:
    """The line for ``--top`` larger than the trials with a usable checkpoint: what was asked,
    what there is, and what is used; trials without one are counted only when there are any."""
    none = n_trials - n_usable
    lacking = (f" ({none} of the {n_trials} trials {'has' if none == 1 else 'have'} none)"
               if none else "")  # fmt: skip
    return (f"--top {top} asks for more members than the {n_usable} trial"
            f"{'s' if n_usable != 1 else ''} with a usable checkpoint{lacking}; using {n_usable}")


def select_members(
    trials: pd.DataFrame, manifest: pd.DataFrame, *, method: str, top: int,
    task: Task | None = None, console=None, path: list | None = None,
) -> tuple[list[Member], dict[str, int], pd.DataFrame, dict[str, np.ndarray]]:
    """Members (in order), how often each was picked, and the aligned val images and
    probabilities of every candidate that was read. ``path``, when given, receives how the val
    study log loss moved with each member added (greedy: each round's pick; top: rank order)."""
    task = task or Task.from_dict(None)
    if method == "top":
        chosen = select_top(trials, top)
        members = [load_member(r.trial_id, r.best_checkpoint) for r in chosen.itertuples()]
        val_images, val_probs = align_val(members, manifest, task)
        n_usable = len(usable_trials(trials))
        if n_usable < top and console is not None:
            console.print(f"[yellow]{_top_shortfall(top, n_usable, len(trials))}[/]")
        if path is not None:
            path.extend(selection_path(val_probs, val_images, [m.trial_id for m in members], task))
        return members, {m.trial_id: 1 for m in members}, val_images, val_probs
    ok = usable_trials(trials)
    if ok.empty:
        raise CheckpointError(none_usable(trials))
    candidates = {r.trial_id: load_member(r.trial_id, r.best_checkpoint) for r in ok.itertuples()}
    val_images, val_probs = align_val(list(candidates.values()), manifest, task)
    picks = greedy_picks(val_probs, val_images, max_rounds=top, task=task, path=path)
    return [candidates[t] for t in picks], picks, val_images, val_probs


def run_ensemble(
    *,
    experiment: str | None = None,
    storage: str = "reports",
    top: int = 4,
    method: str = "top",
    tta: bool = False,
    out: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    target_sensitivity: float = L.TARGET_SENSITIVITY,
    worklist_rule: str = "max",
    test_data: str | None = None,
    test_format: str | None = None,
    oof: bool = False,
    console=None,
) -> str:
    """``raysearch ensemble``: select members, score them on test, write the reports.

    ``top`` is K for ``method="top"`` and the number of greedy rounds for ``method="greedy"``.
    ``oof``: select on the out-of-fold predictions of ``raysearch refit`` instead of the val
    split, and score each selected configuration as the mean of its fold models
    (:mod:`raysearch.ensemble.oof`).
    ``target_sensitivity``: the sensitivity each label's val-chosen threshold must reach on val
    (threshold_metrics.parquet); ``worklist_rule``: ``max`` or ``noisy_or``, how P(any finding)
    is derived when the task has no any-finding label (Sick) (:mod:`raysearch.evaluation.triage`).
    ``test_data`` (with ``test_format``, its ``data.format``): another dataset to score the
    ensemble on, through the label mapping (:func:`cross_dataset`).
    Returns the output folder URI. Warns when the experiment is unfinished (an interrupted
    search); raises :class:`ExperimentLockedError` when another run writes the experiment and the
    output would go into it. Raises :class:`ConfigError`, before any work, for an option out of
    range (``top``, ``n_boot``, ``seed`` outside [0, 2**32 - 1], ``target_sensitivity``).
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    if method not in METHODS:
        raise ConfigError(f"method: unknown value {method!r}; allowed: {', '.join(METHODS)}")
    if top < 1:
        raise ConfigError(f"--top must be >= 1, got {top}")
    if n_boot < 1:
        raise ConfigError(f"--n-boot must be >= 1, got {n_boot}")
    check_seed("--seed", seed)  # the bootstrap's numpy generator takes no negative seed
    if not 0.0 < target_sensitivity <= 1.0:
        raise ConfigError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}")
    if worklist_rule not in T.RULES:
        raise ConfigError(f"--worklist-rule: unknown value {worklist_rule!r}; allowed: "
                          f"{', '.join(T.RULES)}")
    exp_dir = find_experiment(experiment, storage=storage)
    out_dir = out or join(exp_dir, "ensemble")
    inside = join(out_dir).startswith(exp_dir.rstrip("/") + "/")
    # One writer per experiment: an ensemble written into it while a search runs is refused.
    lock = ExperimentLock(exp_dir, command="ensemble") if inside else contextlib.nullcontext()
    with lock:
        if oof:
            from raysearch.ensemble.oof import run_oof_ensemble

            if test_data is not None:
                raise ConfigError("--oof with --test-data is not supported yet: run the "
                                  "cross-dataset test on a val-selected ensemble")

            return run_oof_ensemble(exp_dir, out_dir, top=top, method=method, tta=tta,
                                    n_boot=n_boot, seed=seed, console=console)
        return _run_ensemble(
            exp_dir, out_dir, top=top, method=method, tta=tta, n_boot=n_boot, seed=seed,
            target_sensitivity=target_sensitivity, worklist_rule=worklist_rule,
            test_data=test_data, test_format=test_format, console=console,
        )


def _run_ensemble(exp_dir, out_dir, *, top, method, tta, n_boot, seed, target_sensitivity,
                  worklist_rule, test_data, test_format, console) -> str:
    from raysearch.inference.predictor import Predictor

    info, trials, manifest, task = _read_experiment(exp_dir)
    name = info.get("name") or exp_dir.rstrip("/").rsplit("/", 1)[-1]
    # The other dataset is read first: a bad root or format fails before any inference.
    other = read_other_dataset(test_data, test_format, console=console) if test_data else None
    _warn_unfinished(name, info, trials, console=console)

    # --- select members on the saved val predictions
    path: list[dict] = []
    members, picks, val_images, val_probs = select_members(
        trials, manifest, method=method, top=top, task=task, console=console, path=path
    )
    weights = {t: n / sum(picks.values()) for t, n in picks.items()}
    console.print(
        f"[bold]{name}[/]: {method} ensemble of {len(members)} member(s) from {len(trials)} trials"
    )

    # --- score every member on test, through the predictor (fail fast on a missing weights
    # file before any inference)
    predictor = Predictor(members, weights=[weights[m.trial_id] for m in members], task=task)
    for m in members:
        predictor.model(m)
        predictor.unload(m.trial_id)
    test_images, test_probs = predict_split(
        predictor, manifest, task, split="test", cache_dir=cache_dir(exp_dir, info), tta=tta,
        console=console,
    )

    # --- predictions, metrics, worklist: all in memory before anything is written
    images, studies = ensemble_frames(
        {"test": (test_images, test_probs), "val": (val_images, val_probs)}, weights, task
    )
    models = {"ensemble": "prob", **{m.trial_id: prob_column(m.trial_id) for m in members}}
    metrics = category_table(images, studies, models=models, n_boot=n_boot, seed=seed, task=task)
    members_df = members_frame(members, weights, trials, val_images=val_images,
                               val_probs=val_probs, picks=picks, task=task)
    thresholds = val_thresholds(studies, task)
    # Per label: the ensemble and its best single member (lowest best val_loss), as the tables
    # compare them; every member would multiply the bootstrap's cost for little insight.
    best = _best_member(members_df)
    label_df, threshold_df = label_tables(
        studies, models={"ensemble": "prob", best: prob_column(best)}, task=task, n_boot=n_boot,
        seed=seed, target_sensitivity=target_sensitivity,
    )
    work, triage, used_rule = triage_frames(studies, task, rule=worklist_rule, n_boot=n_boot,
                                            seed=seed)
    cross, other_format = None, None
    if other is not None:
        other_format = str(test_format or other[1].name).lower()
        cross, _ = cross_dataset(
            predictor, home_task=task, home_format=_format_of(info, task), home_metrics=label_df,
            other_manifest=other[0], other_task=other[1], other_format=other_format,
            cache_dir=cache_dir(exp_dir, info), tta=tta, n_boot=n_boot, seed=seed,
            console=console,
        )
    summary = {
        "experiment": exp_dir, "method": method, "top": top, "tta": tta, "n_boot": n_boot,
        # The decision threshold for predict and serve, per label, chosen on val studies (the
        # reports above decide at the task's threshold, the baseline's protocol).
        "threshold": thresholds[task.labels[0]] if task.k == 1 else thresholds,
        "threshold_rule": "max Cohen's kappa on val studies",
        "selection": "val", "folds": None, "selection_path": path,
        "seed": seed, "device": predictor.device.type, "weights": weights,
        "target_sensitivity": target_sensitivity, "worklist_rule": used_rule,
        "test_data": test_data, "test_format": other_format,
        "task": task.to_dict(), "n_test_studies": int(studies.loc[studies["split"] == "test",
                                                                   "study_id"].nunique()),
    }

    # --- write (each file atomically; ensemble.json last marks a complete run)
    g = task.group
    write_parquet(members_df, join(out_dir, "members.parquet"), S.MEMBERS)
    write_parquet(studies, join(out_dir, "study_predictions.parquet"), S.STUDY_PREDICTIONS, group=g)
    write_parquet(images, join(out_dir, "image_predictions.parquet"), S.IMAGE_PREDICTIONS, group=g)
    write_parquet(metrics, join(out_dir, "category_metrics.parquet"), S.CATEGORY_METRICS, group=g)
    write_parquet(label_df, join(out_dir, "label_metrics.parquet"), S.LABEL_METRICS, group=g)
    write_parquet(threshold_df, join(out_dir, "threshold_metrics.parquet"), S.THRESHOLD_METRICS,
                  group=g)
    write_parquet(work, join(out_dir, "worklist.parquet"), S.WORKLIST, group=g)
    write_parquet(triage, join(out_dir, "triage.parquet"), S.TRIAGE)
    if cross is not None:
        write_parquet(cross, join(out_dir, "cross_dataset.parquet"), S.CROSS_DATASET)
    # MURA's worklist.csv keeps its columns; with several labels it is worklist.parquet's list.
    work_csv = worklist(studies, task) if task.k == 1 else work
    atomic_write_text(join(out_dir, "worklist.csv"), work_csv.to_csv(index=False))
    atomic_write_text(join(out_dir, "ensemble.json"), json.dumps(summary, indent=1))
    _print_tables(name, members_df, metrics, task, console=console)
    _print_thresholds(studies, thresholds, task, console=console)
    _print_label_tables(label_df, threshold_df, triage, task, best=best, rule=used_rule,
                        target=target_sensitivity, console=console)
    if cross is not None:
        from raysearch.report.tables import cross_dataset_table

        console.print(cross_dataset_table(
            cross, title=f"cross-dataset test: {name} on its test split and on {test_data} "
                         f"({other_format})"))
    console.print(f"results: {out_dir}")
    return out_dir


def val_thresholds(studies: pd.DataFrame, task: Task, *, split: str = "val") -> dict[str, float]:
    """Per label, the threshold on the ensemble's study probability that maximises Cohen's kappa
    on the selection set's studies (``split``: val, or oof for ``ensemble --oof``)
    (:func:`raysearch.evaluation.metrics.choose_threshold`)."""
    val = studies[studies["split"] == split]
    out = {}
    for label in task.labels:
        sub = val[val["label_name"] == label] if "label_name" in val.columns else val
        out[label] = M.choose_threshold(sub["label"], sub["prob"], default=task.threshold)
    return out


def _print_thresholds(studies: pd.DataFrame, thresholds: dict[str, float], task: Task, *,
                      console, selection: str = "val") -> None:
    """One line per label: the val-chosen threshold and test kappa at it and at the default."""
    test = studies[studies["split"] == "test"]
    for label, t in thresholds.items():
        sub = test[test["label_name"] == label] if "label_name" in test.columns else test
        at = M.cohen_kappa(sub["label"], M.predict(sub["prob"], threshold=t))
        base = M.cohen_kappa(sub["label"], M.predict(sub["prob"], threshold=task.threshold))
        console.print(
            f"decision threshold{f' for {label}' if task.k > 1 else ''}: {t:.3f} (max kappa on "
            f"{selection}; predict and serve use it); test kappa {at:.3f} at it, {base:.3f} at "
            f"{task.threshold:g}"
        )


def _warn_unfinished(name: str, info: dict[str, Any], trials: pd.DataFrame, *, console) -> None:
    state = info.get("state", "finished")
    unfinished = int((trials["status"] == "unfinished").sum()) if "status" in trials else 0
    if state != "finished" or unfinished:
        console.print(
            f"[yellow]warning: experiment {name} is unfinished (state {state}"
            + (f", {unfinished} unfinished trial(s)" if unfinished else "")
            + "): this ensemble is built from a partial search; run the search's command again "
            "to finish it[/]"
        )


def _best_member(members_df: pd.DataFrame) -> str:
    """The member with the lowest best val_loss (chosen on val): the single model to beat."""
    return members_df.sort_values(["best_val_loss", "trial_id"], kind="stable")["trial_id"].iloc[0]


def _print_label_tables(label_df, threshold_df, triage, task: Task, *, best: str, rule: str,
                        target: float, console) -> None:
    """Per label on test: AUC and AP of the ensemble and its best member, the ensemble's
    precision/recall/F1 at the thresholds; then the triage figures of the worklist."""
    from raysearch.report.tables import label_table, threshold_table, triage_table

    console.print(label_table(label_df, best=best, split="test", group=task.group,
                              title=f"test, per label (all {task.group.replace('_', ' ')}s): "
                                    f"ensemble vs best single member {best}"))
    console.print(threshold_table(threshold_df, model="ensemble", split="test",
                                  group=task.group, target=target,
                                  title="test, ensemble: precision / recall / F1 by threshold"))
    console.print(triage_table(triage, title=f"test worklist by P(any finding) ({rule}): "
                                             "abnormal studies found vs a random order"))


def _print_tables(name: str, members_df, metrics, task: Task, *, console, best: str | None = None,
                  selection: str = "val") -> None:
    """The terminal report: the members, then per group the ensemble against its best single
    member (lowest best val_loss, chosen on the selection set: val, or oof for ``--oof``), on
    it and on test. With K > 1 labels the per-label tables that follow take their place (two
    kappa tables per label would bury them; they are all in category_metrics.parquet)."""
    from raysearch.report.tables import ensemble_table, members_table

    if best is None:
        best = _best_member(members_df)
    console.print(members_table(members_df, title=f"{name}: ensemble members"))
    if task.k > 1:
        return
    for label in task.labels:
        rows = metrics if task.k == 1 else metrics[metrics["label_name"] == label]
        suffix = "" if task.k == 1 else f", {label}"
        what = "val" if selection == "val" else "out-of-fold, every training study"
        console.print(ensemble_table(
            rows, best=best, split=selection, group=task.group,
            title=f"selection set ({what}{suffix}): optimistic, the members were chosen on it",
        ))
        console.print(ensemble_table(
            rows, best=best, split="test", group=task.group,
            title=f"test{suffix}: ensemble vs best single member {best}",
        ))
