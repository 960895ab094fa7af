"""Train stage, the plain-torch part of a trial: one epoch, validation, precise BatchNorm
statistics, the optimiser and the learning-rate schedule. No Ray here, so it runs (and is tested,
and checked on a GPU by ``scripts/gpu_check.sh``) without a cluster; :mod:`raysearch.train.worker`
wraps it for Ray Train.

Shapes: a batch is uint8 images ``[B, 1, S, S]``, targets ``[B, K]`` (float, NaN where a label
is masked) and cache rows ``[B]``; the model gives logits ``[B, K]``, K the task's labels.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from raysearch.config import TrialConfig
from raysearch.data.dataset import Task, slug
from raysearch.errors import DataError
from raysearch.evaluation import metrics as M
from raysearch.inference.predictor import autocast_for, predict_batches

__all__ = [
    "EpochResult",
    "SplitRows",
    "bn_batches",
    "gather_probs",
    "lr_lambda",
    "make_lr_schedule",
    "make_optimizer",
    "masked_bce",
    "predict_rows",
    "split_rows",
    "targets",
    "train_epoch",
    "training_rows",
    "val_metrics",
]


# ----------------------------------------------------------------------------- data


@dataclass
class SplitRows:
    """One split of the manifest: its rows in the cache and the manifest rows, aligned."""

    rows: np.ndarray  # int64 [N]: rows in the cache
    frame: pd.DataFrame  # manifest rows, aligned with ``rows``


def split_rows(manifest: pd.DataFrame, cache, name: str) -> SplitRows:
    """The ``name`` split (train, val, test) of the manifest; DataError when it is empty."""
    frame = manifest[manifest["split"] == name].reset_index(drop=True)
    if frame.empty:
        raise DataError(f"the `{name}` split is empty")
    return SplitRows(rows=cache.rows_for(frame["image_path"].tolist()), frame=frame)


def training_rows(manifest: pd.DataFrame, cache, task: Task, *, uncertain: str | None) -> SplitRows:
    """The train split, its targets under the trial's uncertainty policy ``uncertain``
    (``trial.uncertain``; None keeps the manifest's, see :func:`raysearch.data.labels.retarget`).
    Only training targets change: val and test keep ``data.uncertain``'s, so every trial of a
    search is scored on the same val targets."""
    from raysearch.data.labels import retarget

    train = split_rows(manifest, cache, "train")
    if uncertain is None:
        return train
    frame = retarget(train.frame, task, uncertain=uncertain)
    if frame.empty:
        raise DataError(f"trial.uncertain {uncertain}: no training images are left")
    return SplitRows(rows=cache.rows_for(frame["image_path"].tolist()), frame=frame)


def targets(frame: pd.DataFrame, task: Task) -> np.ndarray:
    """The task's labels of ``frame`` as float32 ``[N, K]``, NaN where a label is masked."""
    missing = [c for c in task.label_columns if c not in frame.columns]
    if missing:
        raise DataError(f"the manifest has no label column {', '.join(missing)} for task {task.name}")
    return frame[list(task.label_columns)].to_numpy(np.float32).reshape(len(frame), task.k)


# ----------------------------------------------------------------------------- optimisation


def make_optimizer(cfg: TrialConfig, params: Iterable[torch.nn.Parameter] | Iterable[dict]
                   ) -> torch.optim.Optimizer:
    """Adam or AdamW (``cfg.optimizer``) at ``cfg.lr`` with ``cfg.weight_decay``, over
    ``params`` or parameter groups with their own ``lr``
    (:func:`raysearch.models.finetune.optimizer_groups`)."""
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_lr_schedule(cfg: TrialConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """The MURA paper's lr / 10 when val_loss plateaus (stepped once per epoch with it), or a
    linear warm-up then cosine decay per step (``cfg.lr_schedule``)."""
    if cfg.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.1, patience=cfg.plateau_patience
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))


def lr_lambda(cfg: TrialConfig, steps_per_epoch: int):
    """The factor on ``lr`` at each step: linear warm-up over ``warmup_epochs``, then a cosine
    decay to 0 at ``max_epochs`` (Loshchilov & Hutter, SGDR, 2017)."""
    total = max(1, cfg.max_epochs * steps_per_epoch)
    warmup = max(0, cfg.warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def masked_bce(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted binary cross-entropy over the known labels: ``sum(w * bce) / n_known``.

    ``logits``, ``y`` and ``w`` are ``[B, K]``; a label is masked where ``y`` is NaN. With no
    label masked this is ``mean(w * bce)``, the loss raysearch has always used for MURA (K = 1).
    """
    known = ~torch.isnan(y)
    bce = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y), reduction="none")
    return (bce * w * known).sum() / known.sum().clamp(min=1)


@dataclass
class EpochResult:
    """What one training epoch did: mean loss over its images, images seen, seconds."""

    loss: float
    images: int
    seconds: float


def train_epoch(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    augment,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    weight_by_row: torch.Tensor,
    device: torch.device,
    step_schedule=None,
    nan_loss: bool = False,
) -> EpochResult:
    """One pass over ``batches`` of (uint8 images, targets ``[B, K]``, cache rows): augment on the
    device, forward under autocast (bf16 on CUDA), masked weighted BCE, backward, step.

    ``weight_by_row`` holds each cache row's loss weights ``[rows, K]``; ``step_schedule`` is
    stepped after every optimiser step (the per-step cosine schedule); ``nan_loss`` makes the loss
    NaN (fault injection, to test that a failing trial fails cleanly).
    """
    from raysearch.models.finetune import freeze_batchnorm

    model.train()
    freeze_batchnorm(model)  # a frozen backbone's BatchNorm keeps its pretrained statistics
    autocast, _ = autocast_for(device)
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    seen = 0
    for images, y, rows in batches:
        x = augment.train_batch(images.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True).reshape(len(x), -1)
        w = weight_by_row[rows].to(device, non_blocking=True)
        with autocast:
            logits = model(x).float()
        loss = masked_bce(logits, y, w)
        if nan_loss:
            loss = loss * float("nan")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if step_schedule is not None:
            step_schedule.step()
        loss_sum += loss.detach() * len(y)
        seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return EpochResult(float(loss_sum) / max(1, seen), seen, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- validation


def predict_rows(model, augment, cache, rows: np.ndarray, *, batch_size: int, device,
                 hflip: bool = False) -> np.ndarray:
    """Probabilities ``[len(rows), K]`` for ``rows`` of the cache, in order (eval mode, no
    augmentation): the predictor's own :func:`~raysearch.inference.predictor.predict_batches`."""
    from raysearch.data.loader import BatchLoader

    if len(rows) == 0:
        return np.empty((0, 0), dtype=np.float32)
    loader = BatchLoader(
        cache, rows, np.zeros(len(rows), np.float32), batch_size=batch_size, shuffle=False,
        pin_memory=device.type == "cuda",
    )
    return predict_batches(model, (images for images, _, _ in loader), augment=augment,
                           device=device, tta=hflip)


def bn_batches(cache, rows, augment, *, n_images, batch_size, seed, epoch, rank, world,
               device) -> Iterator[torch.Tensor]:
    """A fresh seeded sample of ``n_images`` training images each epoch, un-augmented (as the
    model sees images at validation), this rank's share of it, batch by batch: the input of
    precise BatchNorm statistics (``raysearch.models.factory.recompute_bn_stats``)."""
    from raysearch.data.loader import BatchLoader

    rng = np.random.default_rng([seed, epoch, 1])
    pick = rng.choice(len(rows), size=min(n_images, len(rows)), replace=False)  # mixed batches
    loader = BatchLoader(
        cache, rows[pick], np.zeros(len(pick), np.float32), batch_size=batch_size, shuffle=False,
        drop_last=len(pick) // world >= batch_size, rank=rank, world_size=world,
        pin_memory=device.type == "cuda",
    )
    for images, _, _ in loader:
        if len(images) > 1:  # BatchNorm in train mode needs two values per channel
            yield augment.eval_batch(images.to(device, non_blocking=True))


def gather_probs(probs: np.ndarray, world_size: int) -> list[np.ndarray]:
    """Every rank's ``probs`` (in rank order); this rank's alone without DDP."""
    if world_size == 1:
        return [probs]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, probs)
    return gathered


def val_metrics(frame: pd.DataFrame, probs: np.ndarray, task: Task) -> dict[str, float]:
    """What a trial reports each epoch, from its val probabilities ``[N, K]``.

    ``val_loss`` (image-level BCE over the known labels), ``val_auc`` (image level), and the
    study-level ``val_study_accuracy`` and ``val_study_kappa`` (studies aggregated by the task's
    rule, positive above its threshold), with ``val_kappa_<group>`` per group. For K > 1 each is
    the mean over the labels, and ``val_auc_<label>`` is added per label.
    """
    probs = np.asarray(probs, dtype=np.float64).reshape(len(frame), task.k)
    y = targets(frame, task)
    out: dict[str, float] = {}
    per_label = []
    for j, label in enumerate(task.labels):
        known = ~np.isnan(y[:, j])
        images = frame.loc[known, ["study_id", "patient_id", task.group]].assign(
            label=y[known, j].astype(np.int64), prob=probs[known, j]
        )
        studies = M.aggregate_studies(images, group=task.group, rule=task.aggregation)
        truth = studies["label"].to_numpy()
        pred = M.predict(studies["prob"].to_numpy(), threshold=task.threshold)
        m = {
            "val_loss": M.log_loss(images["label"], images["prob"]),
            "val_auc": M.roc_auc(images["label"], images["prob"]),
            "val_study_accuracy": float((truth == pred).mean()),
            "val_study_kappa": M.cohen_kappa(truth, pred),
        }
        for part in [*task.groups, *sorted(set(studies[task.group]) - set(task.groups))]:
            sel = (studies[task.group] == part).to_numpy()
            if sel.any():
                m[f"val_kappa_{slug(str(part))}"] = M.cohen_kappa(truth[sel], pred[sel])
        per_label.append(m)
        if task.k > 1:
            out[f"val_auc_{slug(label)}"] = m["val_auc"]
    for key in per_label[0]:
        values = [m[key] for m in per_label if key in m and not math.isnan(m[key])]
        out[key] = float(np.mean(values)) if values else math.nan
    return {k: float(v) for k, v in out.items()}
