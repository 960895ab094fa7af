"""Explain stage, the explainer: a predictor's members' maps for one image, each brought back to
the original frame, and the ensemble's map.

Each member sees the image exactly as the predictor feeds it
(:func:`raysearch.data.images.letterbox` at the member's own image size, then
:class:`~raysearch.data.augment.DeviceAugment`'s normalisation): explaining at another size
would explain another prediction, so the size is never changed; ``layer`` picks an earlier
layer for finer maps instead.

Never imports ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from raysearch.data.augment import DeviceAugment
from raysearch.errors import ConfigError
from raysearch.explain.frame import ensemble_map, to_original
from raysearch.explain.maps import METHODS, ExplainedNet, member_maps, resolve_target
from raysearch.models.registry import cam_layer

__all__ = ["Explainer", "ImageExplanation"]


@dataclass
class ImageExplanation:
    """One image explained.

    ``gray``: the decoded image, uint8 ``[H, W]`` (before letterboxing); ``maps``: trial id ->
    the member's unnormalised map, float32 ``[H, W]`` in the original frame; ``probs``: trial id
    -> the member's probability of the explained class; ``prob``: the ensemble's (weighted mean);
    ``ensemble``: the ensemble map, float32 ``[H, W]`` in [0, 1]."""

    gray: np.ndarray
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    probs: dict[str, float] = field(default_factory=dict)
    prob: float = float("nan")
    ensemble: np.ndarray | None = None


class Explainer:
    """Maps of ``method`` for ``label`` (default: the task's first label) at ``layer`` (default:
    each architecture's registered layer) for a :class:`~raysearch.inference.Predictor`'s
    members. Raises :class:`ConfigError` up front for an unknown method or label, "normal" on a
    task of several labels, and a member whose architecture has no registered layer."""

    def __init__(self, predictor, *, method: str = "gradcam", label: str | None = None,
                 layer: str | None = None) -> None:
        if method not in METHODS:
            raise ConfigError(f"unknown --method {method!r}; allowed: {', '.join(METHODS)}")
        self.predictor = predictor
        self.method = method
        self.layer = layer
        self.target = resolve_target(predictor.task, label)
        for m in predictor.members:
            if getattr(m.config, "binary_relevance", False):
                # One network per label (models.PerLabelModels): each label's maps would come
                # from another network, which the per-member maps here do not model yet.
                raise ConfigError(f"member {m.trial_id}: explain does not support binary "
                                  "relevance members (binary_relevance: true) yet")
        if layer is None:
            for m in predictor.members:
                try:
                    cam_layer(m.config.arch)
                except ConfigError as e:
                    raise ConfigError(f"member {m.trial_id}: {e}") from None
        self._nets: dict[str, ExplainedNet] = {}
        self._augments: dict[str, DeviceAugment] = {}

    def net(self, member) -> ExplainedNet:
        """The member's network wrapped for explanations (loaded on first use)."""
        if member.trial_id not in self._nets:
            self._nets[member.trial_id] = ExplainedNet(self.predictor.model(member),
                                                       member.config.arch)
            self._augments[member.trial_id] = DeviceAugment(
                member.config.augment_params(), device=self.predictor.device, seed=0)
        return self._nets[member.trial_id]

    def member_map(self, member, gray) -> tuple[np.ndarray, float]:
        """(unnormalised map float32 ``[h, w]`` at the layer's resolution, probability of the
        explained class) of one member for a decoded grayscale PIL image."""
        from raysearch.data.images import letterbox

        net = self.net(member)
        pixels = letterbox(gray, image_size=member.config.image_size)
        batch = torch.from_numpy(pixels)[None, None]
        x = self._augments[member.trial_id].eval_batch(batch)
        out = member_maps(net, x, method=self.method, target=self.target, layer=self.layer)
        z = self.target.sign * float(out.logits[0, self.target.index])
        return out.maps[0], float(1.0 / (1.0 + np.exp(-z)))

    def explain(self, source) -> ImageExplanation:
        """Every member's map and the ensemble's for one image (a path, URL, bytes or array, as
        the predictor takes it). Raises :class:`~raysearch.errors.DataError` naming an image that
        cannot be read, :class:`~raysearch.errors.CheckpointError` for a missing checkpoint."""
        from raysearch.data.images import decode_gray

        gray = decode_gray(source)
        width, height = gray.size
        out = ImageExplanation(gray=np.asarray(gray, dtype=np.uint8).copy())
        for m in self.predictor.members:
            raw, p = self.member_map(m, gray)
            out.maps[m.trial_id] = to_original(raw, width=width, height=height)
            out.probs[m.trial_id] = p
        weights = [self.predictor.weights[t] for t in out.maps]
        out.prob = float(sum(w * out.probs[t] for w, t in zip(weights, out.maps)))
        out.ensemble = ensemble_map(list(out.maps.values()), weights=weights,
                                    probs=list(out.probs.values()))
        return out
