"""Explain stage: where a trained model or ensemble looked (Grad-CAM, HiResCAM, Grad-CAM++, CAM),
for one image, a study, the worst errors on test, and a shortcut audit against the synthetic
data's boxes.

Per-member maps come from the ``grad-cam`` library, unnormalised (:mod:`.maps`); each is brought
back to the original image frame, undoing the member's letterbox and resize, and the members are
combined into one ensemble map (:mod:`.frame`, :mod:`.explainer`). ``raysearch explain`` writes
overlays, raw maps and tables (:mod:`.run`); ``--audit`` scores the maps against ground truth
(:mod:`.audit`).

Builds on the inference stage (the predictor, the ensemble folder), the models registry and the
data stage. Never imports ray, nor the train, search or ensemble stages.
"""

from __future__ import annotations

from raysearch.explain.explainer import Explainer, ImageExplanation
from raysearch.explain.maps import METHODS, Target, member_maps, resolve_target

__all__ = ["METHODS", "Explainer", "ImageExplanation", "Target", "member_maps", "resolve_target"]
