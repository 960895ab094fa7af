"""Ensemble members: a trial's best checkpoint read back (config, saved val probabilities,
weights), its val probabilities aligned to the manifest, and its inference on the test split.

Every problem with a checkpoint (a missing file, garbage bytes, weights that do not fit the
architecture, val predictions of another split) is a ``CheckpointError`` naming the trial and file.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from raysearch.config import TrialConfig
from raysearch.errors import CheckpointError, DataError, RaysearchError, name_some
from raysearch.storage import join, read_bytes

VAL_COLUMNS = ("image_path", "study_id", "patient_id", "body_part", "label", "prob")
IMAGE_KEYS = ["image_path", "study_id", "patient_id", "body_part", "split", "label"]


# ----------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Member:
    """A trial's best checkpoint: where it is, its config and its saved val predictions."""

    trial_id: str
    checkpoint: str
    config: TrialConfig
    val: pd.DataFrame  # val_predictions.parquet

    def __repr__(self) -> str:
        return f"Member({self.trial_id!r}, {self.config.arch}, checkpoint={self.checkpoint!r})"


def _checkpoint_file(trial_id: str, checkpoint: str, name: str) -> bytes:
    uri = join(checkpoint, name)
    try:
        return read_bytes(uri)
    except FileNotFoundError:
        raise CheckpointError(
            f"trial {trial_id}: {name} is missing from its checkpoint {checkpoint}"
        ) from None
    except OSError as e:
        raise CheckpointError(f"trial {trial_id}: cannot read {uri} ({e})") from e


def load_member(trial_id: str, checkpoint: str) -> Member:
    """Read a checkpoint's trial.json and val_predictions.parquet (not the weights)."""
    raw = _checkpoint_file(trial_id, checkpoint, "trial.json")
    try:
        config = TrialConfig.from_dict(json.loads(raw))
    except (ValueError, UnicodeDecodeError, RaysearchError) as e:
        raise CheckpointError(
            f"trial {trial_id}: trial.json in {checkpoint} is corrupt ({_first_line(e)})"
        ) from e
    raw = _checkpoint_file(trial_id, checkpoint, "val_predictions.parquet")
    try:
        val = pd.read_parquet(io.BytesIO(raw))
    except Exception as e:  # pyarrow raises several unrelated types on garbage bytes
        raise CheckpointError(
            f"trial {trial_id}: val_predictions.parquet in {checkpoint} is corrupt "
            f"({_first_line(e)})"
        ) from e
    missing = [c for c in VAL_COLUMNS if c not in val.columns]
    if missing:
        raise CheckpointError(
            f"trial {trial_id}: val_predictions.parquet in {checkpoint} lacks {', '.join(missing)}"
        )
    probs = pd.to_numeric(val["prob"], errors="coerce").to_numpy(np.float64)
    if not np.all(np.isfinite(probs)) or ((probs < 0) | (probs > 1)).any():
        raise CheckpointError(
            f"trial {trial_id}: val_predictions.parquet in {checkpoint} has probabilities that "
            "are missing or outside [0, 1]"
        )
    if val["image_path"].duplicated().any():
        raise CheckpointError(
            f"trial {trial_id}: val_predictions.parquet in {checkpoint} lists images twice"
        )
    return Member(trial_id=trial_id, checkpoint=checkpoint, config=config, val=val)


def load_model(member: Member, *, device):
    """The member's network with its best weights, in eval mode on ``device``.

    Raises CheckpointError naming the trial and file when model.pt is missing, unreadable or does
    not fit the member's architecture (see :func:`raysearch.models.weights.load_checkpoint_weights`).
    """
    import torch

    from raysearch.models.factory import create_model
    from raysearch.models.weights import load_checkpoint_weights

    raw = _checkpoint_file(member.trial_id, member.checkpoint, "model.pt")
    try:
        state = torch.load(io.BytesIO(raw), map_location=device, weights_only=True)
    except Exception as e:  # unpickling garbage raises anything from EOFError to RuntimeError
        raise CheckpointError(
            f"trial {member.trial_id}: model.pt in {member.checkpoint} is not a readable state "
            f"dict ({type(e).__name__}: {_first_line(e)})"
        ) from e
    model = create_model(member.config.arch, weights="none", dropout=member.config.dropout)
    load_checkpoint_weights(
        model, state, arch=member.config.arch,
        source=f"trial {member.trial_id}: model.pt in {member.checkpoint}",
    )  # fmt: skip
    return model.to(device).eval()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def align_val(
    members: list[Member], manifest: pd.DataFrame
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The val images (manifest order) and each member's saved probabilities aligned to them.

    Every member must have predicted exactly the manifest's val images; anything else means the
    checkpoint belongs to another dataset or split, and mixing it in would be silently wrong.
    """
    images = manifest.loc[manifest["split"] == "val", IMAGE_KEYS].reset_index(drop=True)
    if images.empty:
        raise DataError("the experiment's manifest has no `val` images to select members on")
    wanted = pd.Index(images["image_path"])
    probs = {}
    for m in members:
        got = pd.Index(m.val["image_path"])
        extra, missing = got.difference(wanted), wanted.difference(got)
        if len(extra) or len(missing):
            raise CheckpointError(
                f"trial {m.trial_id}: the val predictions in {m.checkpoint} do not match the "
                f"manifest's val split ({len(missing)} images missing, {len(extra)} extra, e.g. "
                f"{name_some(list(missing[:3]) or list(extra[:3]))})"
            )
        aligned = m.val.set_index("image_path").reindex(wanted)
        if (aligned["label"].to_numpy() != images["label"].to_numpy()).any():
            raise CheckpointError(
                f"trial {m.trial_id}: the val labels in {m.checkpoint} disagree with the manifest"
            )
        probs[m.trial_id] = aligned["prob"].to_numpy(np.float64)
    return images, probs


# ----------------------------------------------------------------------------- inference


def predict_test(
    members: list[Member],
    *,
    manifest: pd.DataFrame,
    cache_dir: str,
    tta: bool,
    device,
    console=None,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The test images (manifest order) and each member's probabilities on them, batched."""
    from raysearch.data.augment import DeviceAugment
    from raysearch.data.cache import build_cache
    from raysearch.train.loop import predict_rows

    images = manifest.loc[manifest["split"] == "test", IMAGE_KEYS].reset_index(drop=True)
    if images.empty:
        raise DataError("the experiment's manifest has no `test` images to score the ensemble on")
    caches: dict[int, Any] = {}
    probs = {}
    for i, m in enumerate(members, 1):
        cfg = m.config
        if console is not None:
            console.print(
                f"member {i}/{len(members)}: trial {m.trial_id} ({cfg.arch} @ {cfg.image_size}px) "
                f"on {len(images)} test images{' with flip TTA' if tta else ''}"
            )
        if cfg.image_size not in caches:
            caches[cfg.image_size] = build_cache(
                manifest,
                image_size=cfg.image_size,
                cache_dir=cache_dir,
                progress=console is not None,
            )
        cache = caches[cfg.image_size]
        model = load_model(m, device=device)
        augment = DeviceAugment(cfg.augment_params(), device=device, seed=cfg.seed)
        probs[m.trial_id] = predict_rows(
            model,
            augment,
            cache,
            cache.rows_for(images["image_path"].tolist()),
            batch_size=max(cfg.batch_size, 64),
            device=device,
            hflip=tta,
        ).astype(np.float64)
        del model
    return images, probs
