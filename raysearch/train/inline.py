"""Train stage, the lighter path of a one-worker trial: the training loop runs inside the trial's
Tune driver, with no Ray Train controller and no worker actor.

Through Ray Train, a trial starts three Python processes one after another (the Tune driver,
Ray Train's controller, then the worker, plus Train's small helper actors), and each imports Ray
and torch before the next one starts: most of a trial's time before its first epoch on a small
machine. A trial with one worker needs none of Train's coordination (no process group, no
gathering), so here the driver runs :func:`raysearch.train.worker.train_loop_per_worker` itself
with an :class:`InlineSession`, which writes the checkpoints where Ray Train would
(``<experiment>/train-<trial_id>/checkpoint_*``, the best by val_loss and the latest kept) and
reports each epoch to Tune with ``ray.tune.report``, so ASHA, resume, ``trials.parquet`` and
``ensemble`` see the same files and metrics. Set ``RAYSEARCH_INLINE_TRIALS=0`` to run every trial
through Ray Train.
"""

from __future__ import annotations

import os
from typing import Any

from raysearch.experiment import run_checkpoints
from raysearch.storage import get_fs, join

__all__ = ["InlineSession", "inline_enabled"]


def inline_enabled(workers: int) -> bool:
    """Whether a trial of ``workers`` workers takes the lighter path (one worker, and not turned
    off by ``RAYSEARCH_INLINE_TRIALS=0``)."""
    return workers == 1 and os.environ.get("RAYSEARCH_INLINE_TRIALS", "1") != "0"


class InlineSession:
    """The loop's session (see :class:`raysearch.train.worker.RayTrainSession`) for a one-worker
    trial run in its Tune driver. ``run_dir``: the trial's Train run folder (a URI)."""

    rank, world = 0, 1

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def device(self):
        import ray
        import torch

        if ray.get_gpu_ids() and torch.cuda.is_available():
            return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU
        return torch.device("cpu")

    def prepare_model(self, model):
        return model.to(self.device())

    def get_checkpoint(self):
        """The latest intact checkpoint of the run, as a ``ray.train.Checkpoint`` (None: none)."""
        ckpts = run_checkpoints(self.run_dir)
        if not ckpts:
            return None
        import ray.train  # only to resume: a fresh trial never pays for importing Ray Train

        from raysearch.storage import ray_storage_args

        uri, _ = max(ckpts, key=lambda c: c[1]["epoch"])
        args = ray_storage_args(uri)
        return ray.train.Checkpoint(path=args["storage_path"],
                                    filesystem=args["storage_filesystem"])

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Store ``checkpoint_dir`` as the run's next checkpoint, keep only the best (lowest
        val_loss) and the latest, as Ray Train's ``CheckpointConfig(num_to_keep=1, ...)`` does,
        then report ``metrics`` (with ``checkpoint_path``) to Tune."""
        import ray.tune

        metrics = dict(metrics)
        if checkpoint_dir is not None:
            uri = self._store(checkpoint_dir, epoch=int(metrics["epoch"]))
            metrics["checkpoint_path"] = uri
            self._prune(latest=uri)
        ray.tune.report(metrics)

    def _store(self, folder: str, *, epoch: int) -> str:
        """Upload under a temporary name, then rename: a killed driver leaves no half
        checkpoint under a ``checkpoint_`` name."""
        fs, _ = get_fs(self.run_dir)
        uri = join(self.run_dir, f"checkpoint_{epoch:06d}")
        tmp = join(self.run_dir, f".tmp-checkpoint_{epoch:06d}")
        _, path = get_fs(uri)
        _, tmp_path = get_fs(tmp)
        for p in (tmp_path, path):
            if fs.exists(p):
                fs.rm(p, recursive=True)
        fs.makedirs(tmp_path, exist_ok=True)
        for name in sorted(os.listdir(folder)):
            fs.put_file(os.path.join(folder, name), f"{tmp_path}/{name}")
        fs.mv(tmp_path, path, recursive=True)
        return uri

    def _prune(self, *, latest: str) -> None:
        ckpts = run_checkpoints(self.run_dir)
        if not ckpts:
            return
        best, _ = min(ckpts, key=lambda c: c[1]["val_loss"])
        fs, _ = get_fs(self.run_dir)
        for uri, _ in ckpts:
            if uri not in (best, latest):
                fs.rm(get_fs(uri)[1], recursive=True)
