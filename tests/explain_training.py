"""Test helper: train a small model on a demo dataset with the plain-torch training loop
(raysearch.train.loop, no Ray) and save it as a trial checkpoint the predictor reads."""

from __future__ import annotations

import json
import os

import torch

from raysearch.config import TrialConfig
from raysearch.data.augment import DeviceAugment
from raysearch.data.cache import build_cache
from raysearch.data.loader import BatchLoader
from raysearch.data.mura import MURA_TASK, read_mura
from raysearch.experiment import TrialCheckpoint
from raysearch.models.factory import create_model
from raysearch.train.loop import make_optimizer, split_rows, targets, train_epoch


def train_checkpoint(root: str, folder: str, *, trial_id: str, arch: str = "resnet18",
                     image_size: int = 64, epochs: int = 6, lr: float = 1e-3, seed: int = 0,
                     batch_size: int = 32) -> TrialCheckpoint:
    """Train ``arch`` on ``root``'s train split (same seed, same budget for every dataset) and
    write ``model.pt``, ``trial.json`` and ``task.json`` under ``folder``."""
    torch.set_num_threads(2)
    manifest = read_mura(root, val_fraction=0.1, seed=0)
    cache = build_cache(manifest, image_size=image_size, cache_dir=os.path.join(folder, "cache"),
                        num_workers=1, progress=False)
    train = split_rows(manifest, cache, "train")
    cfg = TrialConfig(arch=arch, weights="none", image_size=image_size, batch_size=batch_size,
                      lr=lr, augment="none", max_epochs=epochs, optimizer="adamw")
    torch.manual_seed(seed)
    model = create_model(arch)
    device = torch.device("cpu")
    augment = DeviceAugment(cfg.augment_params(), device=device, seed=seed)
    y = targets(train.frame, MURA_TASK)
    loader = BatchLoader(cache, train.rows, y, batch_size=batch_size, shuffle=True, seed=seed,
                         drop_last=True)
    optimizer = make_optimizer(cfg, model.parameters())
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    weights = torch.ones(len(cache.index), 1)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        train_epoch(model, loader, augment=augment, optimizer=optimizer, scaler=scaler,
                    weight_by_row=weights, device=device)
    os.makedirs(folder, exist_ok=True)
    torch.save(model.eval().state_dict(), os.path.join(folder, "model.pt"))
    with open(os.path.join(folder, "trial.json"), "w") as f:
        json.dump(cfg.to_dict(), f)
    with open(os.path.join(folder, "task.json"), "w") as f:
        json.dump(MURA_TASK.to_dict(), f)
    return TrialCheckpoint(trial_id=trial_id, checkpoint=folder, config=cfg, task=MURA_TASK)


def held_out_images(root: str):
    """The test split of ``root`` (manifest rows)."""
    manifest = read_mura(root, val_fraction=0.1, seed=0)
    return manifest[manifest["split"] == "test"].reset_index(drop=True)
