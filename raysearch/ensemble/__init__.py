"""Ensemble stage: members selected on val (top-k or greedy), scored on test through the
predictor, reported by study and group.

The package is callable: ``raysearch.ensemble(experiment, top=4)`` is :func:`make_ensemble`
(the Python API's mirror of ``raysearch ensemble``, returning an
:class:`~raysearch.inference.ensemble_folder.Ensemble`). Importing any
module of the stage makes ``raysearch.ensemble`` this package, so the API function could not
take the name on its own; the module's class is set to a callable subclass instead (allowed since
Python 3.5: https://docs.python.org/3/reference/datamodel.html#customizing-module-attribute-access).
"""

from __future__ import annotations

import importlib
import sys
import types

# Public names of the stage, imported from their module on first use (importing the package
# stays cheap: no torch until a name that needs it is used).
_EXPORTS = {
    "greedy_select": "selection",
    "run_ensemble": "run",
    "select_top": "selection",
}
__all__ = ["greedy_select", "make_ensemble", "run_ensemble", "select_top"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_ensemble(experiment=None, **kwargs):
    """:func:`~raysearch.ensemble.run.run_ensemble` (same keywords: ``storage``, ``top``,
    ``method``, ``tta``, ``out``, ``n_boot``, ``seed``, ``console``) on ``experiment`` (an
    :class:`raysearch.Experiment`, a name, folder or URL; None: the newest under ``storage``),
    returning the :class:`~raysearch.inference.ensemble_folder.Ensemble` it wrote."""
    from raysearch.ensemble.run import run_ensemble
    from raysearch.inference.ensemble_folder import Ensemble

    experiment = getattr(experiment, "path", experiment)  # an opened Experiment
    return Ensemble.from_dir(run_ensemble(experiment=experiment, **kwargs))


class _CallableStage(types.ModuleType):
    def __call__(self, experiment=None, **kwargs):
        """``raysearch.ensemble(...)``: :func:`make_ensemble`."""
        return make_ensemble(experiment, **kwargs)


sys.modules[__name__].__class__ = _CallableStage
