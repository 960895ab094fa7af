"""Inference stage: a trained model or ensemble applied to images, anywhere: a notebook, a
Ray Serve replica, a script. Never imports ray, nor the train, search or ensemble stages.
"""

from __future__ import annotations

import importlib

# Public names of the stage, imported from their module on first use.
_EXPORTS = {"Prediction": "predictor", "Predictor": "predictor"}
__all__ = ["Prediction", "Predictor"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
