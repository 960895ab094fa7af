"""Errors: one root exception for everything raysearch reports to a user.

The CLI prints ``str(error)`` as one line and exits non-zero; the traceback appears only with
``--debug``. Messages name the offending thing (a path, a key, a trial).
"""

from __future__ import annotations

from collections.abc import Sequence


class RaysearchError(Exception):
    """Root of every error that raysearch reports to a user."""


class ConfigError(RaysearchError):
    """A YAML file or option is invalid (unknown key, wrong type, bound out of order)."""


class ExperimentExistsError(ConfigError):
    """An experiment of another search space already lives where this one would be written."""

    def __init__(self, message: str, *, experiment_dir: str):
        super().__init__(message)
        self.experiment_dir = experiment_dir


class DataError(RaysearchError):
    """The dataset is missing, malformed or inconsistent."""


class WeightsError(RaysearchError):
    """Pretrained weights are missing, unreadable or do not fit the model."""


class CheckpointError(RaysearchError):
    """A trial checkpoint is missing or corrupt."""


def os_reason(error: OSError) -> str:
    """An OSError's reason in words, without its path: 'permission denied', 'is a directory'."""
    if error.strerror:
        return error.strerror[:1].lower() + error.strerror[1:]
    return str(error).strip() or type(error).__name__


def name_some(items: Sequence[object], *, limit: int = 3) -> str:
    """Return 'a, b, c (+N more)' for error messages that name the first few offenders."""
    items = [str(i) for i in items]
    shown = ", ".join(items[:limit])
    rest = len(items) - limit
    return f"{shown} (+{rest} more)" if rest > 0 else shown
