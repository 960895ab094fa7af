"""Tests for the plain-torch epoch step (raysearch.train.loop): no Ray anywhere."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from raysearch.config import TrialConfig
from raysearch.data.augment import DeviceAugment
from raysearch.data.cache import ArrayStore
from raysearch.data.dataset import Task
from raysearch.data.loader import BatchLoader
from raysearch.models.factory import create_model
from raysearch.train.loop import (
    make_lr_schedule,
    make_optimizer,
    masked_bce,
    predict_rows,
    targets,
    train_epoch,
    val_metrics,
)

TWO = Task(name="two", labels=("a", "b"), group="view", groups=("frontal", "lateral"),
           aggregation="max", maskable=("b",))


def test_masked_bce_is_the_old_loss_for_one_label_and_ignores_masked_labels():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 1), (torch.rand(6, 1) > 0.5).float()
    w = torch.rand(6, 1) + 0.5
    old = (F.binary_cross_entropy_with_logits(logits.squeeze(1), y.squeeze(1), reduction="none")
           * w.squeeze(1)).mean()
    assert torch.allclose(masked_bce(logits, y, w), old)

    logits2 = torch.randn(4, 2)
    y2 = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [1.0, float("nan")], [0.0, 0.0]])
    w2 = torch.ones(4, 2)
    known = ~torch.isnan(y2)
    expected = F.binary_cross_entropy_with_logits(logits2[known], y2[known])
    assert torch.allclose(masked_bce(logits2, y2, w2), expected)
    # A masked label's logit gets no gradient.
    logits2.requires_grad_(True)
    masked_bce(logits2, y2, w2).backward()
    assert logits2.grad[0, 1] == 0 and logits2.grad[2, 1] == 0 and logits2.grad[1, 1] != 0


def _two_label_data(n=48, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
    a = rng.integers(0, 2, n)
    b = rng.integers(0, 2, n).astype(float)
    images[a == 1, :, : size // 2] += 150  # label a: a bright left half
    images[b == 1, : size // 2, :] += 60  # label b: a brighter top half
    b[rng.random(n) < 0.3] = np.nan  # b is masked for some images
    frame = pd.DataFrame({
        "image_path": [f"img{i}" for i in range(n)], "study_id": [f"s{i // 2}" for i in range(n)],
        "patient_id": [f"p{i // 2}" for i in range(n)],
        "view": ["frontal" if i % 2 else "lateral" for i in range(n)],
        "label_a": a.astype(float), "label_b": b,
    })
    # one study, one set of labels: copy the first view's labels to the second
    for col in ("label_a", "label_b"):
        frame[col] = frame.groupby("study_id")[col].transform("first")
    return ArrayStore(images, frame["image_path"]), frame


def test_a_two_label_epoch_learns_with_a_masked_label_and_reports_per_label():
    store, frame = _two_label_data()
    cfg = TrialConfig(arch="mobilenet_v3_small", weights="none", image_size=32, batch_size=16,
                      lr=3e-3, max_epochs=6, lr_schedule="cosine", warmup_epochs=0)
    torch.manual_seed(0)
    model = create_model(cfg.arch, num_labels=TWO.k)
    device = torch.device("cpu")
    augment = DeviceAugment(cfg.augment_params(), device=device, seed=0)
    y = targets(frame, TWO)
    assert y.shape == (len(frame), 2) and np.isnan(y[:, 1]).any()
    loader = BatchLoader(store, np.arange(len(store)), y, batch_size=16, shuffle=True, seed=0)
    optimizer = make_optimizer(cfg, model.parameters())
    schedule = make_lr_schedule(cfg, optimizer, len(loader))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    weights = torch.ones(len(store), 2)
    losses = []
    for epoch in range(1, cfg.max_epochs + 1):
        loader.set_epoch(epoch)
        r = train_epoch(model, loader, augment=augment, optimizer=optimizer, scaler=scaler,
                        weight_by_row=weights, device=device, step_schedule=schedule)
        assert r.images == len(store) and math.isfinite(r.loss)
        losses.append(r.loss)
    assert losses[-1] < losses[0]
    probs = predict_rows(model, augment, store, np.arange(len(store)), batch_size=16,
                         device=device)
    assert probs.shape == (len(store), 2) and ((probs >= 0) & (probs <= 1)).all()
    m = val_metrics(frame, probs, TWO)
    assert {"val_loss", "val_auc", "val_auc_a", "val_auc_b", "val_study_kappa",
            "val_kappa_frontal_lateral"} <= set(m)  # studies hold both views
    assert m["val_auc"] == pytest.approx((m["val_auc_a"] + m["val_auc_b"]) / 2)


def test_nan_loss_injection_makes_the_epoch_loss_nan():
    store, frame = _two_label_data(n=16)
    model = create_model("mobilenet_v3_small", num_labels=2)
    cfg = TrialConfig(arch="mobilenet_v3_small", weights="none", image_size=32)
    loader = BatchLoader(store, np.arange(16), targets(frame, TWO), batch_size=8, shuffle=False)
    r = train_epoch(model, loader, augment=DeviceAugment(cfg.augment_params(), device="cpu", seed=0),
                    optimizer=make_optimizer(cfg, model.parameters()),
                    scaler=torch.amp.GradScaler("cuda", enabled=False),
                    weight_by_row=torch.ones(16, 2), device=torch.device("cpu"), nan_loss=True)
    assert math.isnan(r.loss)
