"""Train stage, the plain-torch part of a trial: the epoch step, validation, precise BatchNorm
statistics and the learning-rate schedule. No Ray here, so it runs (and is tested, and checked on a
GPU) without a cluster; :mod:`raysearch.train.worker` wraps it for Ray Train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from raysearch.config import TrialConfig
from raysearch.data.mura import BODY_PARTS
from raysearch.errors import DataError
from raysearch.evaluation import metrics as M


@dataclass
class SplitRows:
    rows: np.ndarray  # rows in the cache
    frame: pd.DataFrame  # manifest rows, aligned with ``rows``

def split_rows(manifest: pd.DataFrame, cache, name: str) -> SplitRows:
    frame = manifest[manifest["split"] == name].reset_index(drop=True)
    if frame.empty:
        raise DataError(f"the `{name}` split is empty")
    return SplitRows(rows=cache.rows_for(frame["image_path"].tolist()), frame=frame)

def autocast_for(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype
    return torch.autocast("cpu", enabled=False), torch.float32

def lr_lambda(cfg: TrialConfig, steps_per_epoch: int):
    total = max(1, cfg.max_epochs * steps_per_epoch)
    warmup = max(0, cfg.warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f

@torch.no_grad()
def predict_rows(model, augment, cache, rows: np.ndarray, *, batch_size: int, device, hflip=False):
    """Image probabilities for ``rows`` of the cache, in order (eval mode, no augmentation)."""
    from raysearch.data.loader import BatchLoader

    out = np.empty(len(rows), dtype=np.float32)
    if len(rows) == 0:
        return out
    loader = BatchLoader(
        cache, rows, np.zeros(len(rows), np.float32), batch_size=batch_size, shuffle=False,
        pin_memory=device.type == "cuda",
    )
    ctx, _ = autocast_for(device)
    model.eval()
    i = 0
    for images, _, _ in loader:
        x = augment.eval_batch(images.to(device, non_blocking=True))
        with ctx:
            logits = model(x).float().squeeze(1)
        if hflip:
            with ctx:
                logits_f = model(torch.flip(x, dims=[3])).float().squeeze(1)
            p = (torch.sigmoid(logits) + torch.sigmoid(logits_f)) / 2
        else:
            p = torch.sigmoid(logits)
        out[i : i + len(p)] = p.cpu().numpy()
        i += len(p)
    return out

def val_metrics(frame: pd.DataFrame, probs: np.ndarray) -> dict[str, float]:
    """Image-level loss/AUC and study-level accuracy/kappa (overall and per body part)."""
    labels = frame["label"].to_numpy()
    images = frame[["study_id", "patient_id", "body_part", "label"]].assign(prob=probs)
    studies = M.aggregate_studies(images)
    out = {
        "val_loss": M.log_loss(labels, probs),
        "val_auc": M.roc_auc(labels, probs),
    }
    study_labels = studies["label"].to_numpy()
    study_pred = M.predict(studies["prob"].to_numpy())
    out["val_study_accuracy"] = float((study_labels == study_pred).mean())
    out["val_study_kappa"] = M.cohen_kappa(study_labels, study_pred)
    for part in BODY_PARTS:
        sel = (studies["body_part"] == part).to_numpy()
        if sel.any():
            out[f"val_kappa_{part.lower()}"] = M.cohen_kappa(study_labels[sel], study_pred[sel])
    return {k: float(v) for k, v in out.items()}

def gather_probs(probs: np.ndarray, world_size: int) -> list[np.ndarray]:
    if world_size == 1:
        return [probs]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, probs)
    return gathered

def bn_batches(cache, rows, augment, *, n_images, batch_size, seed, epoch, rank, world, device):
    """A fresh seeded sample of ``n_images`` training images each epoch, un-augmented (as the
    model sees images at validation), this rank's share of it, batch by batch."""
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
