"""Errors: one root exception for everything raysearch reports to a user.

The CLI prints ``str(error)`` as one line and exits non-zero; the traceback appears only with
``--debug``. Messages name the offending thing (a path, a key, a trial).
"""

from __future__ import annotations

from collections.abc import Sequence


class RaysearchError(Exception):
    """Root of every error that raysearch reports to a user."""


class ConfigError(RaysearchError):
    """A YAML file or option is invalid (unknown key, wrong type, bound out of order).

    ``key`` is the setting the message starts with (``batch_size must be >= 1, got 0``, or
    `` `batch_size` must be int``), when it is about one setting; :meth:`under` then moves the
    message to where the value came from (``trial.batch_size ...``, ``space.batch_size ...``).
    """

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key

    def under(self, prefix: str) -> ConfigError:
        """This error, located under ``prefix`` (a key path such as ``trial``).

        ``batch_size must ...`` becomes ``trial.batch_size must ...``; a message not about one
        key becomes ``trial: ...``; one that already names its place is returned as it is.
        """
        message = str(self)
        if not prefix or (self.key or "").startswith(f"{prefix}."):
            return self
        if self.key and message.startswith((self.key, f"`{self.key}`")):
            key = f"{prefix}.{self.key}"
            return ConfigError(message.replace(self.key, key, 1), key=key)
        if message.startswith(prefix):  # e.g. "scheduler: `1 <= grace_period` ..."
            return self
        return ConfigError(f"{prefix}: {message}")


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
