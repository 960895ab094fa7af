"""Errors: one root exception for everything raysearch reports to a user.

The CLI prints ``str(error)`` as one line and exits with the error's ``exit_code`` (2 for bad
input, the default); the traceback appears only with ``--debug``. Messages name the offending
thing (a path, a key, a trial).
"""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence


class RaysearchError(Exception):
    """Root of every error that raysearch reports to a user.

    ``exit_code`` is what the CLI exits with: 2 (bad input or a refused operation) unless a
    subclass says otherwise.
    """

    exit_code: int = 2


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


class StorageError(RaysearchError, OSError):
    """Storage refused a read or write: no space left, no permission, an unreachable bucket.

    Also an ``OSError``, so code that handles failed I/O keeps handling it."""


class ExperimentLockedError(RaysearchError):
    """Another raysearch run holds the experiment's lock (one writer per experiment)."""


class ExperimentStateError(RaysearchError):
    """An experiment's saved state cannot be used as it is: damaged, or not written by raysearch.

    A search never falls back from such a state to a new, smaller one; the message says how to
    continue (``--overwrite``, or the repair to make).
    """


class SearchFailedError(RaysearchError):
    """Every trial of a search failed: the search ran, but produced nothing to ensemble."""

    exit_code = 1


class SearchInterrupted(RaysearchError):
    """The search was interrupted (Ctrl-C); what it wrote is marked unfinished."""

    exit_code = 130


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


# Terminal escape sequences (ECMA-48): CSI (colours, cursor moves: ESC [ ... final byte), OSC
# (titles, hyperlinks: ESC ] ... BEL or ESC \\), and two-byte escapes; then C0 controls other
# than tab and newline, and DEL. torch and Ray colour some messages (e.g. "\x1b[31mERROR\x1b[0m").
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|[\x00-\x08\x0b-\x1f\x7f]"
)


def plain(text: str) -> str:
    """``text`` without terminal escape sequences (ANSI colours, cursor moves, OSC links) or
    control characters other than tab and newline, so that an error line reads the same in a
    terminal, a log file and a Parquet column."""
    return _ESCAPES.sub("", text)


def first_line(error: BaseException) -> str:
    """The first non-empty line of ``error``'s message, or of the first exception in its cause
    (``__cause__``, then ``__context__``) chain that has one; the type name when none has.
    Terminal escapes (colour codes) are removed (:func:`plain`).

    Ray's ``ControllerError`` and many wrappers carry an empty message and keep the real reason in
    their cause.
    """
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for line in plain(str(e)).splitlines():
            if line.strip():
                return line.strip()
        e = e.__cause__ or e.__context__
    return type(error).__name__


def os_error_message(error: OSError, *, path: str | None = None) -> str | None:
    """One line for the OSErrors a user can act on, naming the path: no space, no permission,
    read-only; and, when the error names its path, a missing file or folder, a file where a
    folder is needed (or the reverse), a path that already exists, a name too long. None for any other OSError."""
    where = path or error.filename or "the storage"
    named = path or error.filename
    if error.errno == errno.ENOSPC:
        return f"no space left on {where}"
    if error.errno == errno.EDQUOT:
        return f"disk quota exceeded on {where}"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}"
    if error.errno == errno.EROFS:
        return f"read-only file system: {where}"
    if named:  # these need the path to be worth a line of their own
        if error.errno == errno.ENOENT:
            return f"no such file or folder: {named}"
        if error.errno == errno.ENOTDIR:
            return f"not a folder (a file is in the way): {named}"
        if error.errno == errno.EEXIST:  # e.g. a file where a folder is to be made
            return f"already exists: {named}"
        if error.errno == errno.EISDIR:
            return f"is a folder, not a file: {named}"
        if error.errno == errno.ENAMETOOLONG:
            return f"file name too long: {named}"
    return None


def find_os_error(error: BaseException) -> OSError | None:
    """The first OSError with an errno in ``error``'s cause/context chain (itself included)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    return None
