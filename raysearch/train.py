"""Train stage: the loop of one trial on each Ray Train worker (Ray side: :mod:`raysearch.launch`).

A trial fine-tunes one architecture on the decode-once cache and, every epoch, reports what ASHA
and the ensemble need (``val_loss``, study kappa, ...) and writes a checkpoint holding the model,
the resolved trial config and the ``val`` image probabilities, so that ensemble selection never
re-runs inference. A retried or restored trial finds its own checkpoints by its stable run name
(``train-<trial_id>``) and resumes from the latest one.

Checkpoint layout (a directory)::

    model.pt                  state dict of the model (torch.load(weights_only=True))
    train_state.pt            optimizer, lr schedule, epoch counters, augmentation RNG (resume)
    trial.json                the fully resolved TrialConfig
    val_predictions.parquet   image_path, study_id, patient_id, body_part, label, prob
    metrics.json              the metrics reported with this checkpoint
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from raysearch import metrics as M
from raysearch.config import TrialConfig
from raysearch.data import BODY_PARTS
from raysearch.errors import CheckpointError, DataError, first_line
from raysearch.experiment import checkpoint_damage
from raysearch.storage import read_parquet

# ----------------------------------------------------------------------------- per-worker loop


@dataclass
class _Split:
    rows: np.ndarray  # rows in the cache
    frame: pd.DataFrame  # manifest rows, aligned with ``rows``


def _split(manifest: pd.DataFrame, cache, name: str) -> _Split:
    frame = manifest[manifest["split"] == name].reset_index(drop=True)
    if frame.empty:
        raise DataError(f"the `{name}` split is empty")
    return _Split(rows=cache.rows_for(frame["image_path"].tolist()), frame=frame)


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype
    return torch.autocast("cpu", enabled=False), torch.float32


def _lr_lambda(cfg: TrialConfig, steps_per_epoch: int):
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
    from raysearch.loader import BatchLoader

    out = np.empty(len(rows), dtype=np.float32)
    if len(rows) == 0:
        return out
    loader = BatchLoader(
        cache, rows, np.zeros(len(rows), np.float32), batch_size=batch_size, shuffle=False,
        pin_memory=device.type == "cuda",
    )
    ctx, _ = _autocast(device)
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


def _gather(probs: np.ndarray, world_size: int) -> list[np.ndarray]:
    if world_size == 1:
        return [probs]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, probs)
    return gathered


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The loop each Ray Train worker runs. ``config``: trial, manifest, cache_dir."""
    import ray
    import ray.train
    import ray.train.torch

    from raysearch.augment import DeviceAugment
    from raysearch.cache import build_cache
    from raysearch.loader import BatchLoader
    from raysearch.models import create_model, load_checkpoint_weights, recompute_bn_stats
    from raysearch.weighting import example_weights

    cfg = TrialConfig.from_dict(config["trial"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    threads = config.get("torch_threads")
    if threads and not cuda:
        torch.set_num_threads(int(threads))

    # --- data: the cache was built on the driver; opening it is a memory map, not a decode
    manifest = read_parquet(config["manifest"])
    cache = build_cache(
        manifest, image_size=cfg.image_size, cache_dir=config["cache_dir"], progress=False
    )
    train = _split(manifest, cache, "train")
    val = _split(manifest, cache, "val")
    weight_by_row = torch.zeros(len(cache), dtype=torch.float32)
    weight_by_row[torch.from_numpy(train.rows)] = torch.from_numpy(
        example_weights(train.frame, scheme=cfg.class_weighting, fp_bias=cfg.fp_bias)
    )
    loader = BatchLoader(
        cache, train.rows, train.frame["label"].to_numpy(np.float32),
        batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=len(train.rows) > cfg.batch_size,
        rank=rank, world_size=world, pin_memory=cuda,
    )
    val_shard = np.array_split(np.arange(len(val.rows)), world)[rank]

    # --- model, optimiser, schedule
    torch.manual_seed(cfg.seed)  # head initialisation; the worker process is ours alone
    model = create_model(cfg.arch, weights=cfg.weights, dropout=cfg.dropout)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    raw_model = model.module if hasattr(model, "module") else model
    augment = DeviceAugment(
        cfg.augment_params(), device=device, seed=cfg.seed * 1000 + rank, channels_last=cuda
    )
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.lr_schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.1, patience=cfg.plateau_patience
        )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, len(loader)))
    autocast, amp_dtype = _autocast(device)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)

    # --- resume from the latest checkpoint, if this run has one
    start_epoch, best_val_loss, bad_epochs = 0, math.inf, 0
    history: list[dict[str, Any]] = []  # every epoch's report, carried in each checkpoint
    resume_note, saved = None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        saved, resume_note = load_resume_state(checkpoint, device=device)
        if resume_note:
            print(f"raysearch: trial {cfg.arch}: {resume_note}", file=sys.stderr)
    if saved is not None:
        model_state, state, history, used = saved
        load_checkpoint_weights(raw_model, model_state, arch=cfg.arch, source=f"model.pt in {used}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        augment.load_state_dict(state["augment"])
        start_epoch, best_val_loss, bad_epochs = (
            state["epoch"], state["best_val_loss"], state["bad_epochs"]
        )

    if history and (start_epoch >= cfg.max_epochs or history[-1].get("early_stopped")):
        # Restored after it had already finished (the driver died before Tune saved that):
        # report the final epoch again so Tune sees the result, and train nothing.
        ray.train.report(history[-1])
        return

    for epoch in range(start_epoch + 1, cfg.max_epochs + 1):
        # --- train one epoch
        model.train()
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        n_seen = 0
        for images, labels, rows in loader:
            x = augment.train_batch(images.to(device, non_blocking=True))
            y = labels.to(device, non_blocking=True)
            w = weight_by_row[rows].to(device, non_blocking=True)
            with autocast:
                logits = model(x).float().squeeze(1)
            loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).mean()
            if cfg.fail_at_epoch == epoch and cfg.fail_mode == "nan":
                loss = loss * float("nan")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if cfg.lr_schedule == "cosine":
                scheduler.step()
            loss_sum += loss.detach() * len(y)
            n_seen += len(y)
        train_loss = float(loss_sum) / max(1, n_seen)
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"trial {cfg.arch}: training loss is {train_loss} at epoch {epoch}; "
                "lower the learning rate or check the data"
            )
        if cfg.fail_at_epoch == epoch and cfg.fail_mode == "raise":
            raise RuntimeError(f"injected failure at epoch {epoch} (fail_at_epoch)")
        train_time = time.perf_counter() - t0

        # --- validate on this rank's shard, then gather every rank's probabilities
        t1 = time.perf_counter()
        if cfg.precise_bn_images:
            with autocast:
                recompute_bn_stats(raw_model, _bn_batches(
                    cache, train.rows, augment, n_images=cfg.precise_bn_images,
                    batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch, rank=rank, world=world,
                    device=device,
                ))
        shard_probs = predict_rows(
            model, augment, cache, val.rows[val_shard], batch_size=max(cfg.batch_size, 64),
            device=device,
        )
        probs = np.concatenate(_gather(shard_probs, world))
        report = {"epoch": epoch, "train_loss": train_loss, **val_metrics(val.frame, probs)}
        if resume_note:  # said once, with the first epoch after the resume
            report["resume_note"], resume_note = resume_note, None
        val_time = time.perf_counter() - t1

        # --- bookkeeping: schedule, early stopping
        improved = report["val_loss"] < best_val_loss
        best_val_loss = min(best_val_loss, report["val_loss"])
        bad_epochs = 0 if improved else bad_epochs + 1
        if cfg.lr_schedule == "plateau":
            scheduler.step(report["val_loss"])
        stop = bad_epochs >= cfg.early_stop_patience
        report.update(
            best_val_loss=best_val_loss,
            lr=optimizer.param_groups[0]["lr"],
            epoch_time_s=train_time,
            val_time_s=val_time,
            train_images_per_s=n_seen * world / max(train_time, 1e-9),
            early_stopped=stop,
            reported_at=time.time(),
            node_id=ray.get_runtime_context().get_node_id(),
        )

        # --- checkpoint (rank 0 writes, every rank reports)
        history.append(report)
        with tempfile.TemporaryDirectory() as d:
            t2 = time.perf_counter()
            ckpt = None
            if rank == 0:
                _write_checkpoint(d, raw_model, optimizer, scheduler, augment, cfg, val.frame, probs,
                                  epoch=epoch, best_val_loss=best_val_loss, bad_epochs=bad_epochs,
                                  history=history)
                ckpt = ray.train.Checkpoint.from_directory(d)
            report["checkpoint_write_s"] = time.perf_counter() - t2
            ray.train.report(report, checkpoint=ckpt)
        if stop:
            break


def load_resume_state(checkpoint, *, device) -> tuple[tuple | None, str | None]:
    """(model state dict, train state, history, checkpoint path) to resume from, and a note when
    it is not the latest checkpoint's.

    A checkpoint with a missing, empty or truncated file (a full disk, a killed writer) is not a
    resume point: the newest intact checkpoint beside it is used instead (the trial's best, which
    Ray Train keeps too), and the note says so. With none intact, the trial starts over
    (``None``), and the note says that. Files are read with ``torch.load(weights_only=True)``.
    """
    tried = []
    for ckpt in [checkpoint, *_sibling_checkpoints(checkpoint)]:
        name = ckpt.path.rstrip("/").rsplit("/", 1)[-1]
        try:
            with ckpt.as_directory() as d:
                damage = checkpoint_damage({n: os.path.getsize(os.path.join(d, n)) for n in os.listdir(d)})
                if damage:
                    raise CheckpointError(damage)
                model_state = torch.load(os.path.join(d, "model.pt"), map_location=device,
                                         weights_only=True)
                state = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu",
                                   weights_only=True)
                with open(os.path.join(d, "history.json")) as f:
                    history = json.load(f)
        except Exception as e:  # noqa: BLE001 - any unreadable file makes it no resume point
            tried.append(f"{name} is damaged ({first_line(e)[:120]})")
            continue
        note = None
        if tried:
            note = f"{'; '.join(tried)}: resuming from {name} (epoch {state['epoch']}) instead"
        return (model_state, state, history, ckpt.path), note
    return None, f"{'; '.join(tried)}: no intact checkpoint left, the trial starts over"


def _sibling_checkpoints(checkpoint) -> list:
    """The other checkpoints of the same Train run, newest epoch first."""
    import pyarrow.fs as pafs
    import ray.train

    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent = path.rsplit("/", 1)[0]
    try:
        infos = fs.get_file_info(pafs.FileSelector(parent))
    except OSError:
        return []
    found = []
    for info in infos:
        base = info.path.rstrip("/").rsplit("/", 1)[-1]
        if info.type != pafs.FileType.Directory or not base.startswith("checkpoint_"):
            continue
        if info.path.rstrip("/") == path:
            continue
        try:
            with fs.open_input_stream(f"{info.path}/metrics.json") as f:
                epoch = int(json.loads(f.readall()).get("epoch", -1))
        except (OSError, ValueError):
            epoch = -1
        found.append((epoch, info.path))
    return [ray.train.Checkpoint(path=p, filesystem=fs) for _, p in sorted(found, reverse=True)]


def _bn_batches(cache, rows, augment, *, n_images, batch_size, seed, epoch, rank, world, device):
    """A fresh seeded sample of ``n_images`` training images each epoch, un-augmented (as the
    model sees images at validation), this rank's share of it, batch by batch."""
    from raysearch.loader import BatchLoader

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


def _write_checkpoint(d, model, optimizer, scheduler, augment, cfg, val_frame, probs, *, epoch,
                      best_val_loss, bad_epochs, history) -> None:
    torch.save(model.state_dict(), os.path.join(d, "model.pt"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "augment": augment.state_dict(),
            "epoch": epoch,
            "best_val_loss": best_val_loss,
            "bad_epochs": bad_epochs,
        },
        os.path.join(d, "train_state.pt"),
    )
    with open(os.path.join(d, "trial.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    with open(os.path.join(d, "metrics.json"), "w") as f:
        json.dump(history[-1], f, indent=1, default=float)
    with open(os.path.join(d, "history.json"), "w") as f:
        json.dump(history, f, indent=1, default=float)
    preds = val_frame[["image_path", "study_id", "patient_id", "body_part", "label"]].assign(
        prob=probs.astype(np.float32)
    )
    preds.to_parquet(os.path.join(d, "val_predictions.parquet"), index=False)
