"""Inference stage, the predictor: a trained model or ensemble applied to images, anywhere.

A :class:`Predictor` is built from a folder alone, the way nnU-Net's predictor is built from a
trained-model folder: an ensemble folder (``members.parquet`` with each member's checkpoint and
weight), or an experiment folder (its ensemble if it has one, else its best trial). Each member's
checkpoint says how to rebuild it (``trial.json``: architecture, image size, dropout; ``task.json``:
the labels) and holds its weights, read with ``torch.load(weights_only=True)``.

Images go through :func:`raysearch.data.images.preprocess_image`, the very function the
decode-once cache stores, at each member's own image size; a prediction from the cache and one
from the raw file are therefore the same. On a GPU the members run with bf16 autocast (fp16 where
bf16 is missing) and channels_last; on a CPU in float32.

Probabilities are ``[N, K]`` arrays (K labels of the task), one per member and their weighted mean
for the ensemble. Studies aggregate their images by the task's rule (mean or max).

Never imports ray, nor the train, search or ensemble stages: it runs in a notebook, a Ray Serve
replica or a plain script.
"""

from __future__ import annotations

import io
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from raysearch.data.augment import DeviceAugment
from raysearch.data.dataset import Task
from raysearch.errors import CheckpointError, ConfigError, first_line
from raysearch.evaluation import metrics as M
from raysearch.experiment import TrialCheckpoint, read_trial_checkpoint
from raysearch.storage import join, read_bytes

__all__ = [
    "Prediction",
    "Predictor",
    "autocast_for",
    "best_device",
    "load_member_model",
    "predict_batches",
]


# ----------------------------------------------------------------------------- the device


def best_device() -> torch.device:
    """CUDA when there is a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device):
    """(autocast context, compute dtype) for ``device``: bf16 (fp16 where bf16 is missing) on
    CUDA, plain float32 elsewhere."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype
    return torch.autocast("cpu", enabled=False), torch.float32


# ----------------------------------------------------------------------------- running a model


@torch.no_grad()
def predict_batches(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    augment: DeviceAugment,
    device: torch.device,
    tta: bool = False,
) -> np.ndarray:
    """Probabilities ``[N, K]`` (float32) for uint8 batches ``[B, 1, S, S]``, in order.

    The model runs in eval mode under :func:`autocast_for`; ``augment.eval_batch`` turns each
    batch into the normalised 3-channel input the backbone expects. ``tta`` averages the sigmoid
    of the image and of its horizontal mirror.
    """
    model.eval()
    ctx, _ = autocast_for(device)
    out = []
    for images in batches:
        x = augment.eval_batch(images.to(device, non_blocking=True))
        with ctx:
            p = torch.sigmoid(model(x).float())
            if tta:
                p = (p + torch.sigmoid(model(torch.flip(x, dims=[3])).float())) / 2
        out.append(p.cpu().numpy().astype(np.float32))
    if not out:
        return np.empty((0, 0), dtype=np.float32)
    return np.concatenate(out)


def load_member_model(member: TrialCheckpoint, *, k: int, device: torch.device) -> torch.nn.Module:
    """A member's network with its checkpoint's weights, in eval mode on ``device``
    (channels_last on CUDA). Raises :class:`CheckpointError` naming the trial and file when
    ``model.pt`` is missing, unreadable or does not fit the architecture."""
    from raysearch.models.factory import create_model
    from raysearch.models.weights import load_checkpoint_weights

    uri = join(member.checkpoint, "model.pt")
    try:
        raw = read_bytes(uri)
    except FileNotFoundError:
        raise CheckpointError(
            f"trial {member.trial_id}: model.pt is missing from its checkpoint {member.checkpoint}"
        ) from None
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling garbage raises anything from EOFError to RuntimeError
        raise CheckpointError(
            f"trial {member.trial_id}: model.pt in {member.checkpoint} is not a readable state "
            f"dict ({type(e).__name__}: {first_line(e)[:200]})"
        ) from e
    cfg = member.config
    model = create_model(cfg.arch, weights="none", dropout=cfg.dropout, num_labels=k,
                         binary_relevance=cfg.binary_relevance)
    load_checkpoint_weights(
        model, state, arch=cfg.arch, source=f"trial {member.trial_id}: model.pt in {member.checkpoint}"
    )
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


# ----------------------------------------------------------------------------- the predictor


@dataclass
class Prediction:
    """Image probabilities: ``probs`` ``[N, K]`` of the ensemble, ``members`` ``{trial_id: [N, K]}``."""

    probs: np.ndarray
    members: dict[str, np.ndarray] = field(default_factory=dict)


class Predictor:
    """Members (trial checkpoints with ensemble weights) and the task they predict.

    ``Predictor.from_dir(path)`` builds one from an ensemble or experiment folder. Models are
    loaded on first use, onto ``device`` (default: :func:`best_device`).
    """

    def __init__(
        self,
        members: Sequence[TrialCheckpoint],
        *,
        weights: Sequence[float] | None = None,
        task: Task,
        device: torch.device | str | None = None,
        batch_size: int = 64,
        threshold: float | Mapping[str, float] | None = None,
    ) -> None:
        if not members:
            raise ConfigError("a predictor needs at least one member")
        weights = list(weights) if weights is not None else [1.0] * len(members)
        if len(weights) != len(members) or min(weights) < 0 or sum(weights) <= 0:
            raise ConfigError(f"member weights must be >= 0 with a positive sum, got {weights}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.members = list(members)
        total = float(sum(weights))
        self.weights = {m.trial_id: float(w) / total for m, w in zip(self.members, weights)}
        self.task = task
        # The decision thresholds, one per label: the ensemble's (chosen on val) when it has
        # them, else the task's. ``threshold`` is the first label's (the one, for K = 1).
        if threshold is None:
            threshold = task.threshold
        if isinstance(threshold, Mapping):
            missing = [lb for lb in task.labels if lb not in threshold]
            if missing:
                raise ConfigError(f"thresholds lack label(s) {', '.join(missing)}")
            values = [float(threshold[lb]) for lb in task.labels]
        else:
            values = [float(threshold)] * task.k
        if not all(0.0 <= v <= 1.0 for v in values):
            raise ConfigError(f"thresholds must be in [0, 1], got {values}")
        self.thresholds = np.asarray(values, dtype=np.float64)  # [K]
        self.threshold = float(values[0])
        if device is None:
            self.device = best_device()
        else:
            try:
                self.device = torch.device(device)
            except (RuntimeError, TypeError):  # torch's message lists 20 device types
                raise ConfigError(f"device must be a torch device such as cpu, cuda or "
                                  f"cuda:0, got {device!r}") from None
        self.batch_size = int(batch_size)
        self._models: dict[str, torch.nn.Module] = {}

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{m.trial_id} ({m.config.arch} @ {m.config.image_size}px, w={self.weights[m.trial_id]:.2f})"
            for m in self.members
        )
        return f"Predictor(task={self.task.name!r}, device={self.device.type}, members=[{shown}])"

    # --- building
    @classmethod
    def from_dir(
        cls, path: str, *, device: torch.device | str | None = None, top: int | None = None,
        batch_size: int = 64,
    ) -> Predictor:
        """A predictor from an ensemble folder (``members.parquet``) or an experiment folder
        (its ``ensemble/`` if it has one, else its ``top`` best trials, default 1, equally
        weighted). Raises :class:`ConfigError` when the folder is neither, for a ``top`` that is
        not an int >= 1 (0 gave the best trial alone, without a word) and for an unknown
        ``device``."""
        from raysearch.experiment import check_model_folder, read_info, read_trials
        from raysearch.storage import exists

        if top is not None and (isinstance(top, bool) or not isinstance(top, numbers.Integral)
                                or top < 1):
            raise ConfigError(f"top must be an int >= 1, got {top!r}")
        path = check_model_folder(path)
        if exists(join(path, "members.parquet")):
            return cls._from_ensemble(path, device=device, batch_size=batch_size)
        if top is None and exists(join(path, "ensemble", "members.parquet")):
            return cls._from_ensemble(join(path, "ensemble"), device=device, batch_size=batch_size)
        info = read_info(path)
        trials = read_trials(path)
        usable = trials[trials["best_checkpoint"].notna()].sort_values(
            ["best_val_loss", "trial_id"], kind="stable"
        )
        if usable.empty:
            raise CheckpointError(f"experiment {path} has no trial with a checkpoint to predict with")
        chosen = usable.head(top or 1)
        members = [read_trial_checkpoint(r.trial_id, r.best_checkpoint, with_val=False)
                   for r in chosen.itertuples()]
        return cls(members, task=Task.from_dict(info.get("task")), device=device,
                   batch_size=batch_size)

    @classmethod
    def _from_ensemble(cls, folder: str, *, device, batch_size: int) -> Predictor:
        import json

        from raysearch.experiment import read_info, resolve
        from raysearch.experiment.schema import normalize_members
        from raysearch.storage import exists, read_parquet

        table = normalize_members(read_parquet(join(folder, "members.parquet")))
        experiment = folder.rsplit("/", 1)[0]
        members = [
            read_trial_checkpoint(str(r.trial_id), resolve(experiment, str(r.best_checkpoint)),
                                  with_val=False)
            for r in table.itertuples()
        ]
        task, threshold = None, None
        if exists(join(folder, "ensemble.json")):
            summary = json.loads(read_bytes(join(folder, "ensemble.json")))
            task, threshold = summary.get("task"), summary.get("threshold")
        if task is None and exists(join(experiment, "experiment.json")):
            task = read_info(experiment).get("task")
        return cls(members, weights=table["weight"].tolist(), task=Task.from_dict(task),
                   device=device, batch_size=batch_size, threshold=threshold)

    # --- running
    def model(self, member: TrialCheckpoint) -> torch.nn.Module:
        """The member's network, loaded on first use."""
        if member.trial_id not in self._models:
            self._models[member.trial_id] = load_member_model(
                member, k=self.task.k, device=self.device
            )
        return self._models[member.trial_id]

    def unload(self, trial_id: str) -> None:
        """Free a member's loaded network (it is loaded again when next used)."""
        self._models.pop(trial_id, None)

    def _augment(self, member: TrialCheckpoint) -> DeviceAugment:
        return DeviceAugment(member.config.augment_params(), device=self.device, seed=0,
                             channels_last=self.device.type == "cuda")

    def _combine(self, members: dict[str, np.ndarray]) -> Prediction:
        probs = sum(self.weights[t] * p.astype(np.float64) for t, p in members.items())
        return Prediction(probs=np.asarray(probs, dtype=np.float64), members=members)

    def predict(
        self,
        sources: Sequence[str | bytes | np.ndarray],
        *,
        tta: bool = False,
        on_batch: Callable[[int], None] | None = None,
    ) -> Prediction:
        """Probabilities for images given as paths, URLs, encoded bytes or decoded arrays.

        Each image is decoded once per distinct member image size. Raises
        :class:`~raysearch.errors.DataError` naming the first image that cannot be read.
        ``on_batch(n)`` is called after each batch of ``n`` images of the first member (a
        progress bar's advance).
        """
        from raysearch.data.images import preprocess_image

        by_size: dict[int, np.ndarray] = {}
        for size in sorted({m.config.image_size for m in self.members}):
            by_size[size] = np.stack(
                [preprocess_image(s, image_size=size) for s in sources]
            ) if len(sources) else np.empty((0, size, size), np.uint8)
        return self.predict_preprocessed(by_size, tta=tta, on_batch=on_batch)

    def predict_preprocessed(
        self,
        arrays: Mapping[int, Any],
        *,
        rows: np.ndarray | None = None,
        tta: bool = False,
        on_batch: Callable[[int], None] | None = None,
    ) -> Prediction:
        """Probabilities for images already preprocessed: ``arrays[S]`` is a ``[N, S, S]`` uint8
        array (or an :class:`~raysearch.data.cache.ImageCache`'s ``images``) at every member
        image size S; ``rows`` picks and orders rows of them (default: all, in order)."""
        members = {
            m.trial_id: self.predict_member(m, arrays, rows=rows, tta=tta,
                                            on_batch=on_batch if i == 0 else None)
            for i, m in enumerate(self.members)
        }
        return self._combine(members)

    def predict_member(
        self,
        member: TrialCheckpoint,
        arrays: Mapping[int, Any],
        *,
        rows: np.ndarray | None = None,
        tta: bool = False,
        batch_size: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """One member's probabilities ``[N, K]`` on preprocessed images (see
        :meth:`predict_preprocessed`); ``[0, K]`` for no images."""
        size = member.config.image_size
        if size not in arrays:
            raise ConfigError(f"no {size} px images for member {member.trial_id}")
        images = arrays[size]
        idx = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
        if not len(idx):  # predict_batches cannot know K without a batch
            return np.empty((0, self.task.k), dtype=np.float32)
        return predict_batches(
            self.model(member),
            _batches(images, idx, batch_size or self.batch_size, on_batch=on_batch),
            augment=self._augment(member), device=self.device, tta=tta,
        )

    def predict_studies(
        self,
        images: pd.DataFrame,
        *,
        source: str = "image_path",
        tta: bool = False,
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Image and study tables for ``images`` (one row per image, with ``study_id`` and a
        ``source`` column of paths, URLs or bytes; ``patient_id`` and the task's group column
        are carried over when present).

        The image table gains the task's probability columns (``prob`` for one label,
        ``prob_<label>`` for several) and ``prob_<trial_id>`` per member (K = 1); the study table
        aggregates them by the task's rule and adds ``pred`` (K = 1) at the task's threshold.
        """
        pred = self.predict(images[source].tolist(), tta=tta)
        out = images.copy()
        prob_cols = list(self.task.prob_columns)
        for j, col in enumerate(prob_cols):
            out[col] = pred.probs[:, j]
        if self.task.k == 1:
            for tid, p in pred.members.items():
                out[f"prob_{tid}"] = p[:, 0]
            prob_cols += [f"prob_{tid}" for tid in pred.members]
        keys = [c for c in ("patient_id", self.task.group) if c in out.columns]
        grouped = out.groupby("study_id", sort=True)
        studies = grouped[keys].first() if keys else pd.DataFrame(index=grouped.size().index)
        studies["n_images"] = grouped.size()
        for col in prob_cols:
            studies[col] = getattr(grouped[col], self.task.aggregation)()
        studies = studies.reset_index()
        if self.task.k == 1:
            studies.insert(studies.columns.get_loc("prob") + 1, "pred",
                           M.predict(studies["prob"], threshold=self.threshold))
        return out, studies


def _batches(images, idx: np.ndarray, batch_size: int, *, on_batch=None):
    """uint8 ``[B, 1, S, S]`` tensors of ``images[idx]``, in order (rows read sorted, for memmaps)."""
    for start in range(0, len(idx), batch_size):
        pick = idx[start : start + batch_size]
        order = np.argsort(pick, kind="stable")
        block = np.empty((len(pick), 1, *images.shape[1:]), dtype=np.uint8)
        block[order, 0] = images[pick[order]]
        yield torch.from_numpy(block)
        if on_batch is not None:
            on_batch(len(pick))

