"""Search stage: many trials under Ray Tune. ``space`` reads the search-space file, ``searcher`` is
Optuna's side (TPE told what ASHA did), ``scheduler`` ASHA with rungs that survive a resume,
``resources`` the plan that never deadlocks, ``tune`` the search itself, ``results`` its tables
and ``progress`` the live view.
"""

from __future__ import annotations

import importlib

# Public names of the stage, imported from their module on first use (importing the package
# stays cheap: no torch until a name that needs it is used).
_EXPORTS = {
    "SearchSpace": "space",
    "collect_results": "results",
    "load_search_space": "space",
    "parse_search_space": "space",
    "plan_resources": "resources",
    "run_search": "tune",
}
__all__ = ["SearchSpace", "collect_results", "load_search_space", "parse_search_space", "plan_resources", "run_search"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
