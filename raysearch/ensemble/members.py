"""Ensemble stage, the members: trials' best checkpoints read back (through
:func:`raysearch.experiment.read_trial_checkpoint`), their saved val probabilities aligned to the
manifest, and their test probabilities from the predictor.

Probabilities are ``[N, K]`` arrays, K the task's labels. To evaluate them, images are stacked
into one row per (image, label) (:func:`stack_labels`): the study aggregation, the metrics and the
selection then run on that one long table whatever K is. Every problem with a checkpoint (a missing
file, garbage bytes, weights that do not fit the architecture, val predictions of another split)
is a ``CheckpointError`` naming the trial and file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from raysearch.data.dataset import Task
from raysearch.errors import CheckpointError, DataError, name_some
from raysearch.experiment import TrialCheckpoint, read_trial_checkpoint

__all__ = ["Member", "align_val", "image_keys", "load_member", "predict_split", "stack_labels"]

Member = TrialCheckpoint  # a trial's best checkpoint, as an ensemble member


def load_member(trial_id: str, checkpoint: str) -> TrialCheckpoint:
    """Read a member's ``trial.json``, task and ``val_predictions.parquet`` (not its weights)."""
    return read_trial_checkpoint(trial_id, checkpoint, with_val=True)


def image_keys(task: Task) -> list[str]:
    """The manifest columns an image row of the ensemble's tables keeps."""
    return ["image_path", "study_id", "patient_id", task.group, "split", *task.label_columns]


def align_val(
    members: Sequence[TrialCheckpoint], manifest: pd.DataFrame, task: Task
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The val images (manifest order) and each member's saved probabilities ``[N, K]`` aligned
    to them.

    Every member must have predicted exactly the manifest's val images, with the same labels and
    the same task; anything else means the checkpoint belongs to another dataset or split, and
    mixing it in would be silently wrong (:class:`CheckpointError`).
    """
    images = manifest.loc[manifest["split"] == "val", image_keys(task)].reset_index(drop=True)
    if images.empty:
        raise DataError("the experiment's manifest has no `val` images to select members on")
    wanted = pd.Index(images["image_path"])
    probs = {}
    for m in members:
        if m.task.labels != task.labels:
            raise CheckpointError(
                f"trial {m.trial_id}: its checkpoint {m.checkpoint} predicts {list(m.task.labels)}, "
                f"the experiment's task {list(task.labels)}"
            )
        got = pd.Index(m.val["image_path"])
        extra, missing = got.difference(wanted), wanted.difference(got)
        if len(extra) or len(missing):
            raise CheckpointError(
                f"trial {m.trial_id}: the val predictions in {m.checkpoint} do not match the "
                f"manifest's val split ({len(missing)} images missing, {len(extra)} extra, e.g. "
                f"{name_some(list(missing[:3]) or list(extra[:3]))})"
            )
        aligned = m.val.set_index("image_path").reindex(wanted)
        saved = aligned[list(task.label_columns)].to_numpy(np.float64)
        truth = images[list(task.label_columns)].to_numpy(np.float64)
        if not np.array_equal(saved, truth, equal_nan=True):
            raise CheckpointError(
                f"trial {m.trial_id}: the val labels in {m.checkpoint} disagree with the manifest"
            )
        probs[m.trial_id] = aligned[list(task.prob_columns)].to_numpy(np.float64)
    return images, probs


def predict_split(
    predictor, manifest: pd.DataFrame, task: Task, *, split: str, cache_dir: str, tta: bool,
    console=None,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The ``split`` images (manifest order) and each member's probabilities ``[N, K]`` on them,
    from the predictor run on the decode-once caches (one per member image size)."""
    from raysearch.data.cache import build_cache

    images = manifest.loc[manifest["split"] == split, image_keys(task)].reset_index(drop=True)
    if images.empty:
        raise DataError(f"the experiment's manifest has no `{split}` images to score the ensemble on")
    paths = images["image_path"].tolist()
    caches = {
        size: build_cache(manifest, image_size=size, cache_dir=cache_dir,
                          progress=console is not None)
        for size in sorted({m.config.image_size for m in predictor.members})
    }
    probs = {}
    for i, m in enumerate(predictor.members, 1):
        cfg, cache = m.config, caches[m.config.image_size]
        if console is not None:
            console.print(
                f"member {i}/{len(predictor.members)}: trial {m.trial_id} ({cfg.arch} @ "
                f"{cfg.image_size}px) on {len(images)} {split} images"
                f"{' with flip TTA' if tta else ''}"
            )
        probs[m.trial_id] = predictor.predict_member(
            m, {cfg.image_size: cache.images}, rows=cache.rows_for(paths), tta=tta,
            batch_size=max(cfg.batch_size, 64),
        )
        predictor.unload(m.trial_id)  # one member in memory at a time
    return images, probs


def stack_labels(
    images: pd.DataFrame, probs: dict[str, np.ndarray], task: Task
) -> pd.DataFrame:
    """One row per (image, known label): the image's keys, ``label_name``, ``label`` (0/1) and a
    column per entry of ``probs`` (``[N, K]`` arrays aligned with ``images``). Masked labels
    (NaN) are left out. For K = 1 there is one row per image."""
    frames = []
    for j, (name, col) in enumerate(zip(task.labels, task.label_columns)):
        known = images[col].notna().to_numpy()
        keys = [c for c in images.columns if c not in task.label_columns]
        frame = images.loc[known, keys].copy()
        frame.insert(frame.columns.get_loc("study_id") + 1, "label_name", name)
        frame["label"] = images.loc[known, col].astype(np.int64).to_numpy()
        for key, p in probs.items():
            frame[key] = np.asarray(p, dtype=np.float64).reshape(len(images), task.k)[known, j]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
