"""Benchmark, the epoch step against the model alone, without Ray: how much of a GPU's (or a
CPU's) speed the training step keeps once it feeds real uint8 batches through the loader,
on-device augmentation and the masked loss (:func:`raysearch.train.loop.train_epoch`), measured
side by side with forward + backward + step on tensors already on the device. Both run with the
same autocast (bf16 on CUDA) and memory format (channels_last on CUDA). Generated data only, so it
runs on a machine with no dataset and no Ray (``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

__all__ = ["bench_step"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(
    *,
    arch: str,
    image_size: int,
    batch_size: int,
    steps: int = 30,
    warmup: int = 5,
    rounds: int = 5,
    device: torch.device | str | None = None,
    num_labels: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Images per second of the pure model step and of the epoch step, and their paired ratio.

    The two arms take turns in ``rounds`` short rounds (:func:`raysearch.bench.paired.alternate`)
    of ``steps`` timed batches of ``batch_size`` images at ``image_size`` px each, after
    ``warmup`` untimed batches for each. Returns the median ``pure_images_per_s`` and
    ``step_images_per_s``, ``ratio`` (the median of the per-round ratios step / pure; 1.0 means
    the input pipeline and the loss cost nothing; None when flagged), ``ratio_low`` /
    ``ratio_high`` (their range), ``flag`` (why the ratio cannot be right: the epoch step
    faster than the model alone beyond the noise), the device, the autocast dtype and whether
    channels_last was used.
    """
    import statistics

    import torch.nn.functional as F

    from raysearch.bench.paired import alternate, paired_ratio
    from raysearch.config import TrialConfig
    from raysearch.data.augment import DeviceAugment
    from raysearch.data.cache import ArrayStore
    from raysearch.data.loader import BatchLoader
    from raysearch.inference.predictor import autocast_for, best_device
    from raysearch.models.factory import create_model
    from raysearch.train.loop import make_optimizer, train_epoch

    device = torch.device(device) if device is not None else best_device()
    cuda = device.type == "cuda"
    autocast, amp_dtype = autocast_for(device)
    cfg = TrialConfig(arch=arch, weights="none", image_size=image_size, batch_size=batch_size,
                      augment="mura", lr=1e-4, max_epochs=1)

    def model_and_optimizer():
        torch.manual_seed(seed)
        model = create_model(arch, num_labels=num_labels).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        return model, make_optimizer(cfg, model.parameters())

    # 1. The model alone: one batch already on the device, normalised, in the right layout.
    model, optimizer = model_and_optimizer()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch_size, num_labels, device=device) > 0.5).float()
    model.train()

    def step() -> None:
        with autocast:
            logits = model(x).float()
        loss = F.binary_cross_entropy_with_logits(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()

    def pure_round(_: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        return steps * batch_size / (time.perf_counter() - t0)

    # 2. The epoch step: uint8 images from a store, through the loader, augmented on the device.
    rng = np.random.default_rng(seed)
    n = (steps + warmup) * batch_size
    store = ArrayStore(rng.integers(0, 256, size=(n, image_size, image_size), dtype=np.uint8))
    labels = (rng.random((n, num_labels)) > 0.5).astype(np.float32)
    step_model, step_optimizer = model_and_optimizer()
    augment = DeviceAugment(cfg.augment_params(), device=device, seed=seed, channels_last=cuda)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
    weights = torch.ones(n, num_labels)
    warm = BatchLoader(store, np.arange(warmup * batch_size), labels[: warmup * batch_size],
                       batch_size=batch_size, shuffle=False, pin_memory=cuda)
    timed = BatchLoader(store, np.arange(warmup * batch_size, n), labels[warmup * batch_size :],
                        batch_size=batch_size, shuffle=True, seed=seed, pin_memory=cuda)
    common = {"augment": augment, "optimizer": step_optimizer, "scaler": scaler,
              "weight_by_row": weights, "device": device}
    train_epoch(step_model, warm, **common)

    def step_round(i: int) -> float:
        timed.set_epoch(i)
        result = train_epoch(step_model, timed, **common)  # synchronises before timing ends
        return result.images / result.seconds

    pairs = alternate(pure_round, step_round, rounds=rounds)
    ratio = paired_ratio(pairs, ceiling=1.0,
                         impossible="the epoch step cannot be faster than the model alone")
    return {
        "arch": arch, "image_size": image_size, "batch_size": batch_size,
        "device": str(device), "amp": str(amp_dtype).removeprefix("torch."),
        "channels_last": cuda, "rounds": rounds,
        "pure_images_per_s": statistics.median(a for a, _ in pairs),
        "step_images_per_s": statistics.median(b for _, b in pairs),
        "ratio": ratio.value, "ratio_median": ratio.median, "ratio_low": ratio.low,
        "ratio_high": ratio.high, "flag": ratio.flag, "ratio_text": ratio.text(),
    }


def bench_finetune(
    *,
    arch: str,
    image_size: int,
    batch_size: int,
    mode: str = "head",
    last_n_blocks: int | None = None,
    steps: int = 20,
    warmup: int = 3,
    rounds: int = 3,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Images per second of a ``full`` trial's epoch step against a ``mode`` trial's
    (``finetune``: head, gradual's head-only epochs, or ``last_n_blocks``), side by side.

    Both arms run :func:`raysearch.train.loop.train_epoch` on the same generated uint8 batches,
    with the model frozen as the trial worker freezes it
    (:func:`raysearch.models.finetune.set_trainable`) and an optimiser over
    :func:`~raysearch.models.finetune.optimizer_groups`, in ``rounds`` alternating rounds of
    ``steps`` batches (:func:`raysearch.bench.paired.alternate`). Returns the medians
    ``full_images_per_s`` and ``mode_images_per_s``, ``speedup`` (the median of the per-round
    ratios mode / full, with ``speedup_low``/``speedup_high``), and the trainable parameter
    counts of each arm. No Ray, no dataset.
    """
    import statistics

    from raysearch.bench.paired import alternate, paired_ratio
    from raysearch.config import TrialConfig
    from raysearch.data.augment import DeviceAugment
    from raysearch.data.cache import ArrayStore
    from raysearch.data.loader import BatchLoader
    from raysearch.inference.predictor import autocast_for, best_device
    from raysearch.models.factory import create_model
    from raysearch.models.finetune import backbone_trains, optimizer_groups, set_trainable
    from raysearch.train.loop import make_optimizer, train_epoch

    device = torch.device(device) if device is not None else best_device()
    cuda = device.type == "cuda"
    _, amp_dtype = autocast_for(device)
    cfg = TrialConfig(arch=arch, weights="none", image_size=image_size, batch_size=batch_size,
                      augment="mura", lr=1e-4, max_epochs=2)
    rng = np.random.default_rng(seed)
    n = (steps + warmup) * batch_size
    store = ArrayStore(rng.integers(0, 256, size=(n, image_size, image_size), dtype=np.uint8))
    labels = (rng.random((n, 1)) > 0.5).astype(np.float32)

    def arm(which: str, blocks: int | None):
        torch.manual_seed(seed)
        model = create_model(arch).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        backbone = backbone_trains(which, 1, 1)  # gradual: its head-only epochs
        trainable = set_trainable(model, arch, backbone=backbone, last_n_blocks=blocks)
        groups = optimizer_groups(model, arch, mode=which, lr=1e-4, backbone_lr_mult=1.0,
                                  last_n_blocks=blocks)
        common = {
            "augment": DeviceAugment(cfg.augment_params(), device=device, seed=seed,
                                     channels_last=cuda),
            "optimizer": make_optimizer(cfg, groups),
            "scaler": torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16),
            "weight_by_row": torch.ones(n, 1), "device": device,
        }
        warm = BatchLoader(store, np.arange(warmup * batch_size), labels[: warmup * batch_size],
                           batch_size=batch_size, shuffle=False, pin_memory=cuda)
        train_epoch(model, warm, **common)
        timed = BatchLoader(store, np.arange(warmup * batch_size, n),
                            labels[warmup * batch_size:], batch_size=batch_size, shuffle=True,
                            seed=seed, pin_memory=cuda)

        def run(i: int) -> float:
            timed.set_epoch(i)
            result = train_epoch(model, timed, **common)
            return result.images / result.seconds

        return run, trainable

    full, full_params = arm("full", None)
    other, other_params = arm(mode, last_n_blocks if mode != "head" else None)
    pairs = alternate(full, other, rounds=rounds)
    ratio = paired_ratio(pairs)
    return {
        "arch": arch, "image_size": image_size, "batch_size": batch_size, "mode": mode,
        "last_n_blocks": last_n_blocks, "device": str(device), "rounds": rounds,
        "full_images_per_s": statistics.median(a for a, _ in pairs),
        "mode_images_per_s": statistics.median(b for _, b in pairs),
        "speedup": ratio.median, "speedup_low": ratio.low, "speedup_high": ratio.high,
        "full_trainable": full_params, "mode_trainable": other_params,
    }
