"""Train stage, the Ray Train glue of one trial: what each worker runs (the epochs themselves are
plain torch, in :mod:`raysearch.train.loop`).

A trial fine-tunes one architecture on the decode-once cache and, every epoch, reports what ASHA
and the ensemble need (``val_loss``, study kappa, ...) and writes a checkpoint holding the model,
the resolved trial config, the task and the ``val`` image probabilities
(:mod:`raysearch.train.checkpoint`), so that ensemble selection never re-runs inference. A retried
or restored trial finds its own checkpoints by its stable run name (``train-<trial_id>``) and
resumes from the latest intact one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from typing import Any, TypedDict

import numpy as np
import torch

from raysearch.config import TrialConfig
from raysearch.data.dataset import Task
from raysearch.storage import read_parquet
from raysearch.train.checkpoint import load_resume_state, write_checkpoint
from raysearch.train.loop import (
    bn_batches,
    gather_probs,
    make_lr_schedule,
    make_optimizer,
    predict_rows,
    split_rows,
    targets,
    train_epoch,
    training_rows,
    val_metrics,
)

__all__ = ["LoopConfig", "RayTrainSession", "train_loop_per_worker"]


class LoopConfig(TypedDict):
    """What the driver hands each Ray Train worker (plain data: it crosses the Ray boundary).

    ``trial``: a :class:`TrialConfig` as a dict; ``task``: a :class:`Task` as a dict (missing:
    MURA's); ``manifest``: the experiment's manifest URI; ``cache_dir``: where the decode-once
    caches are; ``torch_threads``: CPU threads per worker (ignored on a GPU).
    """

    trial: dict[str, Any]
    task: dict[str, Any]
    manifest: str
    cache_dir: str
    torch_threads: int


FAULTS_ENV = "RAYSEARCH_FAULTS_FILE"


def injected_fault(trial: dict[str, Any]) -> tuple[int, str] | None:
    """Test hook, not a setting: (epoch, mode) of the fault to inject into this trial, or None.

    ``$RAYSEARCH_FAULTS_FILE`` names a JSON file holding a list of rules
    ``{"when": {"lr": 0.03}, "epoch": 1, "mode": "raise"}``; the first rule whose ``when`` values
    all equal the trial config's applies (no ``when``: every trial). Mode ``raise`` raises after
    the epoch's training, ``nan`` makes its loss NaN. Read here, in the worker, only: the tests
    set the variable before Ray starts (workers inherit it) and change the file between runs. A
    missing or unreadable file injects nothing.
    """
    path = os.environ.get(FAULTS_ENV)
    if not path:
        return None
    try:
        with open(path) as f:
            rules = json.load(f)
    except (OSError, ValueError):
        return None
    for rule in rules if isinstance(rules, list) else []:
        if all(trial.get(k) == v for k, v in rule.get("when", {}).items()):
            return int(rule["epoch"]), str(rule.get("mode", "raise"))
    return None


class RayTrainSession:
    """What the loop asks of Ray Train: rank, world size, device, model preparation (DDP), the
    checkpoint to resume from, and the report of an epoch (metrics and a checkpoint folder).
    :class:`raysearch.train.inline.InlineSession` answers the same for a one-worker trial run
    inside its Tune driver."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self):
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


def train_loop_per_worker(config: LoopConfig, session=None) -> None:
    """The loop each Ray Train worker runs: data, model, resume, then one report and checkpoint
    per epoch until ``max_epochs`` or the trial's own early stopping. ``session``: Ray Train's
    (:class:`RayTrainSession`, the default) or a one-worker trial's inline one."""
    import ray

    from raysearch.data.augment import DeviceAugment
    from raysearch.data.cache import build_cache
    from raysearch.data.loader import BatchLoader
    from raysearch.inference.predictor import autocast_for
    from raysearch.models.factory import create_model, recompute_bn_stats
    from raysearch.models.finetune import backbone_trains, optimizer_groups, set_trainable
    from raysearch.models.weights import load_checkpoint_weights
    from raysearch.train.losses import label_weights

    cfg = TrialConfig.from_saved(config["trial"])
    fail_at_epoch, fail_mode = injected_fault(config["trial"]) or (None, None)
    task = Task.from_dict(config.get("task"))
    session = session or RayTrainSession()
    rank, world = session.rank, session.world
    device = session.device()
    cuda = device.type == "cuda"
    if config.get("torch_threads") and not cuda:
        torch.set_num_threads(int(config["torch_threads"]))

    # --- data: the cache was built on the driver; opening it is a memory map, not a decode
    manifest = read_parquet(config["manifest"])
    cache = build_cache(
        manifest, image_size=cfg.image_size, cache_dir=config["cache_dir"], progress=False
    )
    train = training_rows(manifest, cache, task, uncertain=cfg.uncertain)
    val = split_rows(manifest, cache, "val")
    weight_by_row = torch.zeros((len(cache), task.k), dtype=torch.float32)
    weight_by_row[torch.from_numpy(train.rows)] = torch.from_numpy(
        label_weights(train.frame, task=task, scheme=cfg.class_weighting, fp_bias=cfg.fp_bias)
    )
    loader = BatchLoader(
        cache, train.rows, targets(train.frame, task), batch_size=cfg.batch_size, shuffle=True,
        seed=cfg.seed, drop_last=len(train.rows) > cfg.batch_size, rank=rank, world_size=world,
        pin_memory=cuda,
    )
    val_shard = np.array_split(np.arange(len(val.rows)), world)[rank]

    # --- model, optimiser, schedule
    torch.manual_seed(cfg.seed)  # head initialisation; the worker process is ours alone
    model = create_model(cfg.arch, weights=cfg.weights, dropout=cfg.dropout, num_labels=task.k,
                         binary_relevance=cfg.binary_relevance)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    # What trains (finetune: full | head | gradual): frozen before DDP wraps the model, so that
    # DDP neither allocates gradient buckets for nor all-reduces the frozen backbone.
    backbone_on = backbone_trains(cfg.finetune, 1, cfg.warmup_epochs)  # a resume past a
    # gradual trial's head-only epochs unfreezes at its first epoch below
    set_trainable(model, cfg.arch, backbone=backbone_on, last_n_blocks=cfg.last_n_blocks)
    model = session.prepare_model(model)
    raw_model = model.module if hasattr(model, "module") else model
    augment = DeviceAugment(
        cfg.augment_params(), device=device, seed=cfg.seed * 1000 + rank, channels_last=cuda
    )
    optimizer = make_optimizer(cfg, optimizer_groups(
        raw_model, cfg.arch, mode=cfg.finetune, lr=cfg.lr, backbone_lr_mult=cfg.backbone_lr_factor,
        last_n_blocks=cfg.last_n_blocks,
    ))
    scheduler = make_lr_schedule(cfg, optimizer, len(loader))
    autocast, amp_dtype = autocast_for(device)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)

    # --- resume from the latest intact checkpoint, if this run has one
    start_epoch, best_val_loss, bad_epochs = 0, math.inf, 0
    history: list[dict[str, Any]] = []  # every epoch's report, carried in each checkpoint
    resume_note, saved = None, None
    checkpoint = session.get_checkpoint()
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
        session.report(history[-1])
        return

    for epoch in range(start_epoch + 1, cfg.max_epochs + 1):
        # --- unfreeze the backbone when a gradual trial's head-only epochs are over
        if backbone_trains(cfg.finetune, epoch, cfg.warmup_epochs) and not backbone_on:
            backbone_on = True
            set_trainable(raw_model, cfg.arch, backbone=True, last_n_blocks=cfg.last_n_blocks)
            if world > 1:  # DDP registers its parameters when it wraps: wrap again with them all
                model = session.prepare_model(raw_model)

        # --- train one epoch
        loader.set_epoch(epoch)
        result = train_epoch(
            model, loader, augment=augment, optimizer=optimizer, scaler=scaler,
            weight_by_row=weight_by_row, device=device,
            step_schedule=scheduler if cfg.lr_schedule == "cosine" else None,
            nan_loss=fail_at_epoch == epoch and fail_mode == "nan",
        )
        if not math.isfinite(result.loss):
            raise FloatingPointError(
                f"trial {cfg.arch}: training loss is {result.loss} at epoch {epoch}; "
                "lower the learning rate or check the data"
            )
        if fail_at_epoch == epoch and fail_mode == "raise":
            raise RuntimeError(f"injected failure at epoch {epoch} ({FAULTS_ENV})")

        # --- validate on this rank's shard, then gather every rank's probabilities
        t1 = time.perf_counter()
        if cfg.precise_bn_images:
            with autocast:
                recompute_bn_stats(raw_model, bn_batches(
                    cache, train.rows, augment, n_images=cfg.precise_bn_images,
                    batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch, rank=rank, world=world,
                    device=device,
                ))
        shard = predict_rows(model, augment, cache, val.rows[val_shard],
                             batch_size=max(cfg.batch_size, 64), device=device)
        probs = np.concatenate([p.reshape(-1, task.k) for p in gather_probs(shard, world)])
        report = {"epoch": epoch, "train_loss": result.loss,
                  **val_metrics(val.frame, probs, task)}
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
            epoch_time_s=result.seconds,
            val_time_s=val_time,
            train_images_per_s=result.images * world / max(result.seconds, 1e-9),
            early_stopped=stop,
            reported_at=time.time(),
            node_id=ray.get_runtime_context().get_node_id(),
        )

        # --- checkpoint (rank 0 writes, every rank reports)
        history.append(report)
        with tempfile.TemporaryDirectory() as d:
            report["checkpoint_write_s"] = 0.0  # other ranks write nothing
            if rank == 0:  # sets report["checkpoint_write_s"], and saves it in the checkpoint
                write_checkpoint(d, raw_model, optimizer, scheduler, augment, cfg, task, val.frame,
                                 probs, epoch=epoch, best_val_loss=best_val_loss,
                                 bad_epochs=bad_epochs, history=history)
            session.report(report, checkpoint_dir=d if rank == 0 else None)
        if stop:
            break
