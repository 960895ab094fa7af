"""Train stage, stand-in pretrained weights for the CPU demo: a backbone trained on a separate
synthetic dataset, staged as a weights file that trials load offline like ImageNet weights.

Why: a transfer-learning choice (``finetune: head | gradual | full``) only means something when
the backbone already knows features; ImageNet weights cannot be downloaded everywhere the demo
runs, and from random weights a frozen backbone learns nothing. So ``raysearch weights
stage-demo`` trains the backbone on a *source* dataset, a separate draw of the synthetic
generator (another seed, so other patients and images than the demo data's, including its
``test``), and saves it without its head, as ImageNet files are used: the trial's new head
starts from scratch (:func:`raysearch.models.weights.apply_pretrained`).

The source task is the demo's own (synthetic musculoskeletal findings), so these features suit
the demo far better than ImageNet's suit MURA: frozen-backbone modes look better here than they
would on real data. Plain torch, no Ray.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time

import torch

from raysearch.storage import atomic_write_bytes, atomic_write_text, join

__all__ = ["SOURCE_SEED", "stage_demo_weights"]

SOURCE_SEED = 1000  # the demo data uses seeds 0.. ; the source draw must be another one


def stage_demo_weights(
    to: str = "demo_weights",
    *,
    arch: str = "resnet18",
    image_size: int = 64,
    epochs: int = 4,
    size: str = "small",
    seed: int = SOURCE_SEED,
    batch_size: int = 32,
    console=None,
) -> str:
    """Train ``arch`` from random weights on a fresh synthetic MURA-layout dataset (``size``,
    drawn with ``seed``) for ``epochs`` epochs at ``image_size`` px, and write its backbone's
    state dict (head removed) to ``<to>/<arch>.pt``, with ``<arch>.json`` beside it saying how it
    was made. Returns the weights file's path. Written atomically.

    Raises :class:`~raysearch.errors.ConfigError` for an unknown architecture or demo size.
    """
    from raysearch.config import TrialConfig
    from raysearch.data.augment import DeviceAugment
    from raysearch.data.cache import build_cache
    from raysearch.data.loader import BatchLoader
    from raysearch.data.mura import MURA_TASK, read_mura
    from raysearch.data.synth import make_demo_data
    from raysearch.models.factory import create_model, recompute_bn_stats
    from raysearch.models.finetune import head_module
    from raysearch.train.loop import (
        bn_batches,
        make_lr_schedule,
        make_optimizer,
        targets,
        train_epoch,
    )

    cfg = TrialConfig(arch=arch, weights="none", image_size=image_size, batch_size=batch_size,
                      lr=1e-3, optimizer="adamw", weight_decay=1e-4, lr_schedule="cosine",
                      warmup_epochs=1, max_epochs=epochs, augment="light",
                      class_weighting="none", seed=seed)
    say = console.print if console is not None else (lambda *a, **k: None)
    device = torch.device("cpu")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raysearch-stage-demo-") as tmp:
        say(f"stage-demo: drawing a source dataset ({size}, seed {seed}) ...")
        make_demo_data(tmp, seed=seed, size=size)
        manifest = read_mura(tmp, val_fraction=0.1, seed=seed)
        cache = build_cache(manifest, image_size=image_size, cache_dir=join(tmp, "cache"),
                            progress=False)
        rows = cache.rows_for(manifest["image_path"].tolist())
        y = targets(manifest, MURA_TASK)
        torch.manual_seed(seed)
        model = create_model(arch)
        augment = DeviceAugment(cfg.augment_params(), device=device, seed=seed)
        loader = BatchLoader(cache, rows, y, batch_size=batch_size, shuffle=True, seed=seed,
                             drop_last=True)
        optimizer = make_optimizer(cfg, model.parameters())
        schedule = make_lr_schedule(cfg, optimizer, len(loader))
        weights = torch.ones((len(cache), 1))
        losses = []
        for epoch in range(1, epochs + 1):
            loader.set_epoch(epoch)
            r = train_epoch(model, loader, augment=augment, optimizer=optimizer,
                            scaler=torch.amp.GradScaler("cuda", enabled=False),
                            weight_by_row=weights, device=device, step_schedule=schedule)
            losses.append(r.loss)
            say(f"stage-demo: {arch} epoch {epoch}/{epochs}: train loss {r.loss:.3f}")
        recompute_bn_stats(model, bn_batches(cache, rows, augment, n_images=512,
                                             batch_size=batch_size, seed=seed, epoch=epochs,
                                             rank=0, world=1, device=device))
        n_images = len(manifest)

    head = {id(p) for p in head_module(model, arch).parameters()}
    head_keys = {k for k, p in model.named_parameters() if id(p) in head}
    state = {k: v for k, v in model.state_dict().items() if k not in head_keys}
    buf = io.BytesIO()
    torch.save(state, buf)
    path = join(to, f"{arch}.pt")
    if not os.path.isdir(to):
        os.makedirs(to, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_text(join(to, f"{arch}.json"), json.dumps({
        "arch": arch, "source": f"raysearch synthetic MURA-layout data, size {size}, seed {seed}",
        "images": n_images, "image_size": image_size, "epochs": epochs,
        "train_loss": [round(float(x), 4) for x in losses], "head": "removed",
        "seconds": round(time.perf_counter() - t0, 1),
    }, indent=1) + "\n")
    say(f"stage-demo: {arch} backbone weights at {path} "
        f"(trained {epochs} epochs on {n_images} source images in "
        f"{time.perf_counter() - t0:.0f} s; final train loss {losses[-1]:.3f})")
    return path
