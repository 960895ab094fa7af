"""Train stage: one trial. ``loop`` is the plain-torch epoch and validation, ``checkpoint`` what a
trial saves and resumes from, ``losses`` the class weighting, ``worker`` the Ray Train glue, and
``trainer`` the TorchTrainer of a trial, the Tune driver, and ``raysearch train``.
"""

from __future__ import annotations

import importlib

# Public names of the stage, imported from their module on first use (importing the package
# stays cheap: no torch until a name that needs it is used).
_EXPORTS = {
    "example_weights": "losses",
    "make_trainer": "trainer",
    "run_single": "trainer",
    "train_loop_per_worker": "worker",
    "tune_trial_driver": "trainer",
}
__all__ = ["example_weights", "make_trainer", "run_single", "train_loop_per_worker", "tune_trial_driver"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    from raysearch._compat import moved_name

    return moved_name(__name__, name)
