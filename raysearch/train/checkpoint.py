"""Train stage, a trial's checkpoint: what it holds, how it is written, and how a trial resumes
from it (falling back past a damaged one).

Checkpoint layout (a directory)::

    model.pt                  state dict of the model (torch.load(weights_only=True))
    train_state.pt            optimizer, lr schedule, epoch counters, augmentation RNG (resume)
    trial.json                the fully resolved TrialConfig
    val_predictions.parquet   image_path, study_id, patient_id, group column, label(s), prob(s)
    metrics.json              the metrics reported with this checkpoint
    history.json              every epoch reported so far
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from raysearch.errors import CheckpointError, first_line
from raysearch.experiment import TASK_FILE, checkpoint_damage

__all__ = ["load_resume_state", "write_checkpoint"]


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


def write_checkpoint(d: str, model, optimizer, scheduler, augment, cfg, task, val_frame,
                     probs: np.ndarray, *, epoch: int, best_val_loss: float, bad_epochs: int,
                     history: list[dict]) -> None:
    """Write one checkpoint into the folder ``d`` (see the module docstring for its files).
    ``probs`` are the val probabilities ``[N, K]`` in ``val_frame``'s row order.

    ``history[-1]`` (this epoch's report) gets ``checkpoint_write_s``, the seconds spent writing
    the other files, before ``metrics.json`` and ``history.json`` (small, written last) are
    written: so the last epoch's checkpoint carries its own write time too.
    """
    t0 = time.perf_counter()
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
    keep = ["image_path", "study_id", "patient_id", task.group, *task.label_columns]
    preds = val_frame[keep].copy()
    probs = np.asarray(probs, dtype=np.float32).reshape(len(preds), task.k)
    for j, col in enumerate(task.prob_columns):
        preds[col] = probs[:, j]
    preds.to_parquet(os.path.join(d, "val_predictions.parquet"), index=False)
    for name, value in (("trial.json", cfg.to_dict()), (TASK_FILE, task.to_dict())):
        _write_json(os.path.join(d, name), value)
    history[-1]["checkpoint_write_s"] = time.perf_counter() - t0
    _write_json(os.path.join(d, "metrics.json"), history[-1])
    _write_json(os.path.join(d, "history.json"), history)


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1, default=float)
