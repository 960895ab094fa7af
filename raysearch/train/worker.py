"""Train stage: the loop of one trial on each Ray Train worker (Ray side: :mod:`raysearch.train.trainer`).

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

import math
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raysearch.config import TrialConfig
from raysearch.storage import read_parquet
from raysearch.train.checkpoint import load_resume_state, write_checkpoint
from raysearch.train.loop import (
    autocast_for,
    bn_batches,
    gather_probs,
    lr_lambda,
    predict_rows,
    split_rows,
    val_metrics,
)

# ----------------------------------------------------------------------------- per-worker loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The loop each Ray Train worker runs. ``config``: trial, manifest, cache_dir."""
    import ray
    import ray.train
    import ray.train.torch

    from raysearch.data.augment import DeviceAugment
    from raysearch.data.cache import build_cache
    from raysearch.data.loader import BatchLoader
    from raysearch.models.factory import create_model, recompute_bn_stats
    from raysearch.models.weights import load_checkpoint_weights
    from raysearch.train.losses import example_weights

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
    train = split_rows(manifest, cache, "train")
    val = split_rows(manifest, cache, "val")
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
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(loader)))
    autocast, amp_dtype = autocast_for(device)
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
                recompute_bn_stats(raw_model, bn_batches(
                    cache, train.rows, augment, n_images=cfg.precise_bn_images,
                    batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch, rank=rank, world=world,
                    device=device,
                ))
        shard_probs = predict_rows(
            model, augment, cache, val.rows[val_shard], batch_size=max(cfg.batch_size, 64),
            device=device,
        )
        probs = np.concatenate(gather_probs(shard_probs, world))
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
                write_checkpoint(d, raw_model, optimizer, scheduler, augment, cfg, val.frame, probs,
                                  epoch=epoch, best_val_loss=best_val_loss, bad_epochs=bad_epochs,
                                  history=history)
                ckpt = ray.train.Checkpoint.from_directory(d)
            report["checkpoint_write_s"] = time.perf_counter() - t2
            ray.train.report(report, checkpoint=ckpt)
        if stop:
            break


