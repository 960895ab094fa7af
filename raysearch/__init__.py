"""raysearch: distributed hyperparameter and ensemble search for radiograph classification.

One package per stage, in pipeline order: ``data`` (readers, the task, manifest and split,
decode-once cache, loader, augmentation) -> ``train`` (one trial) -> ``search`` (many trials:
Optuna + ASHA) -> ``ensemble`` (selection on val) -> ``inference`` (a trained model or ensemble
applied to images) -> ``report``; ``models`` and ``evaluation`` serve them all, ``experiment`` owns
the experiment folder, ``storage`` every path and URL.
"""

from raysearch import _compat

__version__ = "0.2.0"

_compat.install()
