"""raysearch: distributed hyperparameter and ensemble search for radiograph classification.

One package per stage, in pipeline order: ``data`` (readers, the task, manifest and split,
decode-once cache, loader, augmentation) -> ``train`` (one trial) -> ``search`` (many trials:
Optuna + ASHA) -> ``ensemble`` (selection on val) -> ``inference`` (a trained model or ensemble
applied to images) -> ``explain`` (where the models looked, and the shortcut audit) ->
``report``; ``models`` and ``evaluation`` serve them all, ``experiment`` owns
the experiment folder, ``storage`` every path and URL.

The Python API (:mod:`raysearch.api`): ``open_experiment``, ``tune``, ``ensemble``, ``refit``,
``Experiment``, ``Ensemble``. They load on first use, so ``import raysearch`` imports neither
torch nor Ray. ``raysearch.ensemble`` is also the ensemble stage's package; that package is
callable and calls :func:`raysearch.api.ensemble`, so both meanings hold.
"""

from raysearch import _compat

__version__ = "0.2.0"

_compat.install()

_API = ("Ensemble", "Experiment", "open_experiment", "refit", "tune")
__all__ = ["Ensemble", "Experiment", "ensemble", "open_experiment", "refit", "tune"]


def __getattr__(name: str):
    import importlib

    if name in _API:
        return getattr(importlib.import_module("raysearch.api"), name)
    if name == "ensemble":  # the stage's package, callable (see raysearch.ensemble)
        return importlib.import_module("raysearch.ensemble")
    raise AttributeError(f"module 'raysearch' has no attribute {name!r}")
