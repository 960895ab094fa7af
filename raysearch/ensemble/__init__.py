"""Ensemble stage: members selected on val (top-k or greedy), scored on test through the
predictor, reported by study and group.
"""

from __future__ import annotations

import importlib

# Public names of the stage, imported from their module on first use (importing the package
# stays cheap: no torch until a name that needs it is used).
_EXPORTS = {
    "greedy_select": "selection",
    "run_ensemble": "run",
    "select_top": "selection",
}
__all__ = ["greedy_select", "run_ensemble", "select_top"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
