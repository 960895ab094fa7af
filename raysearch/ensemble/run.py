"""Ensemble stage: members chosen on val (:mod:`raysearch.ensemble.selection`), scored on test, by study.

``run_ensemble`` reads a finished search (``raysearch tune``): ``experiment.json``,
``trials.parquet``, the manifest and each trial's best checkpoint. Members are *selected* on the
val probabilities saved in the checkpoints (no re-inference, nnU-Net style), then *scored* by
running each member on the ``test`` split (MURA's official validation set), which played no part
in training, early stopping or selection. The val metrics are reported too, labelled
``split == "val"``: they are the selection set and therefore optimistic.

An ensemble's image probability is the weighted mean of its members' (top-k: equal weights;
greedy: how often each member was picked). A study's probability is the mean of its images'
probabilities, and the study is abnormal when that mean is > 0.5 (MURA's rule, see ``metrics``).

Outputs, under ``<experiment>/ensemble/`` or ``out`` (every file written atomically, after
everything has been computed, so a failure leaves no partial file behind)::

    members.parquet            rank, trial_id, weight, picks, best_val_loss, best_epoch, status,
                               val_study_kappa, val_study_log_loss, checkpoint, then every
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
                               patient_id, body_part, prob, pred, label
    ensemble.json              the settings of the run and the member weights (written last)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any

import numpy as np
import pandas as pd

from raysearch.data.mura import BODY_PARTS
from raysearch.ensemble.members import IMAGE_KEYS, Member, align_val, load_member, predict_test
from raysearch.ensemble.selection import (
    column_log_losses,
    greedy_picks,
    none_usable,
    select_top,
    study_matrix,
    usable_trials,
)
from raysearch.errors import CheckpointError, ConfigError, DataError
from raysearch.evaluation import metrics as M
from raysearch.experiment import ExperimentLock, find_experiment, resolve
from raysearch.storage import (
    atomic_write_parquet,
    atomic_write_text,
    exists,
    is_url,
    join,
    read_bytes,
    read_parquet,
)

METHODS = ("top", "greedy")
SPLITS = ("test", "val")  # the honest estimate first, then the selection set
METRIC_COLUMNS = ["model", "split", *M.CATEGORY_COLUMNS, "image_auc"]


# ----------------------------------------------------------------------------- finding things


def _read_experiment(exp_dir: str) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """experiment.json, trials.parquet and the manifest of a finished search."""
    info_uri = join(exp_dir, "experiment.json")
    try:
        info = json.loads(read_bytes(info_uri))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{info_uri} is not valid JSON ({e})") from e
    trials_uri = join(exp_dir, "trials.parquet")
    if not exists(trials_uri):
        raise DataError(
            f"{exp_dir} has no trials.parquet: its search has not finished "
            "(resume it with `raysearch tune SPACE.yaml --resume`)"
        )
    trials = read_parquet(trials_uri)
    missing = [c for c in ("trial_id", "best_val_loss", "best_checkpoint") if c not in trials]
    if missing:
        raise DataError(f"{trials_uri} lacks the columns {', '.join(missing)}")
    trials["trial_id"] = trials["trial_id"].astype(str)
    # Checkpoints are stored relative to the experiment (older ones as absolute paths, which
    # resolve re-roots when the experiment has moved).
    trials["best_checkpoint"] = [resolve(exp_dir, c) for c in trials["best_checkpoint"]]
    # The folder may have moved since the search: prefer the manifest beside experiment.json.
    manifest_uri = join(exp_dir, "manifest.parquet")
    if not exists(manifest_uri):
        manifest_uri = str(info.get("manifest") or manifest_uri)
    if not exists(manifest_uri):
        raise DataError(f"experiment {exp_dir}: its manifest {manifest_uri} is missing")
    return info, trials, read_parquet(manifest_uri)


def _cache_dir(exp_dir: str, info: dict[str, Any]) -> str:
    """Where to find (or build) the image caches: the experiment's own setting while it is
    reachable; for a moved experiment, ``cache/`` beside it (the default place)."""
    saved = info.get("cache_dir")
    beside = f"{exp_dir.rstrip('/').rsplit('/', 1)[0]}/cache"
    if saved and (is_url(str(saved)) or os.path.isdir(str(saved))):
        return str(saved)
    return beside if saved else join(exp_dir, "cache")


# ----------------------------------------------------------------------------- evaluation


def prob_column(trial_id: str) -> str:
    return f"prob_{trial_id}"


def ensemble_frames(
    parts: dict[str, tuple[pd.DataFrame, dict[str, np.ndarray]]],
    weights: dict[str, float],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Image and study predictions for every split: ensemble ``prob``/``pred`` and one
    ``prob_<trial_id>`` column per member."""
    total = sum(weights.values())
    frames = []
    for split, (images, probs) in parts.items():
        frame = images.assign(split=split)[IMAGE_KEYS].copy()
        ens = np.zeros(len(frame), dtype=np.float64)
        for tid, w in weights.items():
            ens += (w / total) * probs[tid]
        frame["prob"] = ens
        frame["pred"] = M.predict(ens)
        for tid in weights:
            frame[prob_column(tid)] = probs[tid]
        frames.append(frame)
    images = pd.concat(frames, ignore_index=True)
    cols = ["prob", *[prob_column(t) for t in weights]]
    studies = M.aggregate_studies(images, prob_cols=cols)
    studies.insert(studies.columns.get_loc("prob") + 1, "pred", M.predict(studies["prob"]))
    return images, studies


def category_table(
    images: pd.DataFrame,
    studies: pd.DataFrame,
    *,
    models: dict[str, str],
    n_boot: int,
    seed: int,
) -> pd.DataFrame:
    """``category_metrics`` for every model (name -> probability column) and split, plus the
    image-level AUC. The same bootstrap seed for every row keeps models comparable."""
    rows = []
    for split in SPLITS:
        st = studies[studies["split"] == split]
        im = images[images["split"] == split]
        if st.empty:
            continue
        for model, col in models.items():
            cm = _all_parts(M.category_metrics(st, prob_col=col, n_boot=n_boot, seed=seed))
            cm["image_auc"] = [
                M.roc_auc(sub["label"], sub[col])
                for sub in (
                    im if part == M.ALL else im[im["body_part"] == part] for part in cm["body_part"]
                )
            ]
            cm.insert(0, "split", split)
            cm.insert(0, "model", model)
            rows.append(cm)
    return pd.concat(rows, ignore_index=True)[METRIC_COLUMNS]


def _all_parts(cm: pd.DataFrame) -> pd.DataFrame:
    """Every body part gets a row, so the schema does not depend on the data: a part without
    studies has n_studies = 0, zero counts and nan metrics."""
    parts = [*BODY_PARTS, *sorted(set(cm["body_part"]) - {*BODY_PARTS, M.ALL}), M.ALL]
    out = cm.set_index("body_part").reindex(parts).reset_index()
    for col in ("n_studies", "tp", "fp", "tn", "fn"):
        out[col] = out[col].fillna(0).astype(np.int64)
    return out


def worklist(studies: pd.DataFrame) -> pd.DataFrame:
    """Test studies from most to least likely abnormal (ties by study id): the triage order."""
    test = studies[studies["split"] == "test"]
    test = test.sort_values(["prob", "study_id"], ascending=[False, True], kind="stable")
    out = test[["study_id", "patient_id", "body_part", "prob", "pred", "label"]].reset_index(
        drop=True
    )
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out


def members_frame(
    members: list[Member],
    weights: dict[str, float],
    trials: pd.DataFrame,
    *,
    val_images: pd.DataFrame,
    val_probs: dict[str, np.ndarray],
    picks: dict[str, int],
) -> pd.DataFrame:
    by_id = trials.set_index("trial_id")
    labels, S = study_matrix(val_images, [val_probs[m.trial_id] for m in members])
    study_losses = column_log_losses(labels, S)
    rows = []
    for rank, (m, loss) in enumerate(zip(members, study_losses), 1):
        t = by_id.loc[m.trial_id]
        rows.append(
            {
                "rank": rank,
                "trial_id": m.trial_id,
                "weight": weights[m.trial_id],
                "picks": picks[m.trial_id],
                "best_val_loss": float(t["best_val_loss"]),
                "best_epoch": int(t["best_epoch"])
                if "best_epoch" in t and pd.notna(t["best_epoch"])
                else None,
                "status": str(t["status"]) if "status" in t else None,
                "val_study_kappa": float(t["val_study_kappa"])
                if "val_study_kappa" in t
                else math.nan,
                "val_study_log_loss": float(loss),
                "checkpoint": m.checkpoint,
                **m.config.to_dict(),
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the command


def select_members(
    trials: pd.DataFrame, manifest: pd.DataFrame, *, method: str, top: int, console=None
) -> tuple[list[Member], dict[str, int], pd.DataFrame, dict[str, np.ndarray]]:
    """Members (in order), how often each was picked, and the aligned val images and
    probabilities of every candidate that was read."""
    if method == "top":
        chosen = select_top(trials, top)
        members = [load_member(r.trial_id, r.best_checkpoint) for r in chosen.itertuples()]
        val_images, val_probs = align_val(members, manifest)
        n_usable = len(usable_trials(trials))
        if n_usable < top and console is not None:
            console.print(
                f"[yellow]only {n_usable} of {len(trials)} trials have a usable checkpoint: "
                f"the ensemble has {n_usable} members, not {top}[/]"
            )
        return members, {m.trial_id: 1 for m in members}, val_images, val_probs
    ok = usable_trials(trials)
    if ok.empty:
        raise CheckpointError(none_usable(trials))
    candidates = {r.trial_id: load_member(r.trial_id, r.best_checkpoint) for r in ok.itertuples()}
    val_images, val_probs = align_val(list(candidates.values()), manifest)
    picks = greedy_picks(val_probs, val_images, max_rounds=top)
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
    console=None,
) -> str:
    """``raysearch ensemble``: select members, score them on test, write the reports.

    ``top`` is K for ``method="top"`` and the number of greedy rounds for ``method="greedy"``.
    Returns the output folder URI. Warns when the experiment is unfinished (an interrupted
    search); raises :class:`ExperimentLockedError` when another run writes the experiment and the
    output would go into it.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    if method not in METHODS:
        raise ConfigError(f"method: unknown value {method!r}; allowed: {', '.join(METHODS)}")
    if top < 1:
        raise ConfigError(f"--top must be >= 1, got {top}")
    if n_boot < 1:
        raise ConfigError(f"--n-boot must be >= 1, got {n_boot}")
    exp_dir = find_experiment(experiment, storage=storage)
    out_dir = out or join(exp_dir, "ensemble")
    inside = join(out_dir).startswith(exp_dir.rstrip("/") + "/")
    # One writer per experiment: an ensemble written into it while a search runs is refused.
    lock = ExperimentLock(exp_dir, command="ensemble") if inside else contextlib.nullcontext()
    with lock:
        return _run_ensemble(
            exp_dir, out_dir, top=top, method=method, tta=tta, n_boot=n_boot, seed=seed,
            console=console,
        )


def _run_ensemble(exp_dir, out_dir, *, top, method, tta, n_boot, seed, console) -> str:
    import torch

    from raysearch.report.tables import ensemble_table, members_table

    info, trials, manifest = _read_experiment(exp_dir)
    name = info.get("name") or exp_dir.rstrip("/").rsplit("/", 1)[-1]
    state = info.get("state", "finished")
    unfinished = int((trials["status"] == "unfinished").sum()) if "status" in trials else 0
    if state != "finished" or unfinished:
        console.print(
            f"[yellow]warning: experiment {name} is unfinished (state {state}"
            + (f", {unfinished} unfinished trial(s)" if unfinished else "")
            + "): this ensemble is built from a partial search; run the search's command again "
            "to finish it[/]"
        )

    # --- select members on the saved val predictions
    members, picks, val_images, val_probs = select_members(
        trials, manifest, method=method, top=top, console=console
    )
    weights = {t: n / sum(picks.values()) for t, n in picks.items()}
    console.print(
        f"[bold]{name}[/]: {method} ensemble of {len(members)} member(s) from {len(trials)} trials"
    )

    # --- score every member on test (fail fast on a missing file before any inference)
    for m in members:
        if not exists(join(m.checkpoint, "model.pt")):
            raise CheckpointError(
                f"trial {m.trial_id}: model.pt is missing from its checkpoint {m.checkpoint}"
            )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache_dir = _cache_dir(exp_dir, info)
    test_images, test_probs = predict_test(
        members, manifest=manifest, cache_dir=cache_dir, tta=tta, device=device, console=console
    )

    # --- predictions, metrics, worklist: all in memory before anything is written
    images, studies = ensemble_frames(
        {"test": (test_images, test_probs), "val": (val_images, val_probs)}, weights
    )
    models = {"ensemble": "prob", **{m.trial_id: prob_column(m.trial_id) for m in members}}
    metrics = category_table(images, studies, models=models, n_boot=n_boot, seed=seed)
    members_df = members_frame(
        members, weights, trials, val_images=val_images, val_probs=val_probs, picks=picks
    )
    work = worklist(studies)
    summary = {
        "experiment": exp_dir,
        "method": method,
        "top": top,
        "tta": tta,
        "n_boot": n_boot,
        "seed": seed,
        "device": device.type,
        "weights": weights,
        "n_test_studies": int((studies["split"] == "test").sum()),
    }

    # --- write (each file atomically; ensemble.json last marks a complete run)
    atomic_write_parquet(members_df, join(out_dir, "members.parquet"))
    atomic_write_parquet(studies, join(out_dir, "study_predictions.parquet"))
    atomic_write_parquet(images, join(out_dir, "image_predictions.parquet"))
    atomic_write_parquet(metrics, join(out_dir, "category_metrics.parquet"))
    atomic_write_text(join(out_dir, "worklist.csv"), work.to_csv(index=False))
    atomic_write_text(join(out_dir, "ensemble.json"), json.dumps(summary, indent=1))

    # --- the terminal report: best single member = lowest best val_loss (chosen on val)
    best = members_df.sort_values(["best_val_loss", "trial_id"], kind="stable")["trial_id"].iloc[0]
    console.print(members_table(members_df, title=f"{name}: ensemble members"))
    console.print(
        ensemble_table(
            metrics,
            best=best,
            split="val",
            title="selection set (val): optimistic, the members were chosen on it",
        )
    )
    console.print(
        ensemble_table(
            metrics,
            best=best,
            split="test",
            title=f"test (MURA valid): ensemble vs best single member {best}",
        )
    )
    console.print(f"results: {out_dir}")
    return out_dir
