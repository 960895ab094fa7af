"""Logging: quiet by default. Libraries' logs go to a file; the terminal gets raysearch's own lines.

Ray logs an ERROR traceback for every failed or retried trial, and gcsfs a long traceback for
every retry of an unreachable bucket. Unless ``-v``, those loggers write to a log file instead
(``$RAYSEARCH_LOG_DIR``, default ``~/.cache/raysearch/logs/``), and raysearch's one-line errors
name that file. This module never imports ray.
"""

from __future__ import annotations

import logging
import os
import time

__all__ = ["LIBRARY_LOGGERS", "log_path", "quiet_libraries"]

LIBRARY_LOGGERS = (
    "raysearch", "ray", "ray.serve", "gcsfs", "google", "google.auth", "urllib3", "fsspec", "optuna", "asyncio",
    "aiohttp", "filelock", "pyarrow",
)  # fmt: skip

_state: dict[str, str | None] = {"path": None}


def log_path() -> str | None:
    """The log file libraries write to in this process, once :func:`quiet_libraries` ran."""
    return _state["path"]


def quiet_libraries(*, verbose: bool = False, command: str = "raysearch") -> str | None:
    """Send the library loggers to a log file (``verbose``: leave them on the terminal).

    Call it again after ``ray.init``, which puts its own terminal handler back on ``ray``.
    Returns the log file's path (None when verbose). Safe to call more than once.
    """
    if verbose:
        return None
    path = _state["path"]
    if path is None:
        folder = os.environ.get("RAYSEARCH_LOG_DIR") or os.path.join(
            os.path.expanduser("~"), ".cache", "raysearch", "logs"
        )
        try:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
            handler: logging.Handler = logging.FileHandler(path, delay=True, encoding="utf-8")
        except OSError:
            path, handler = None, logging.NullHandler()  # an unwritable home: stay quiet anyway
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.set_name("raysearch-log-file")
        _state["path"] = path
        _handlers.append(handler)
    handler = _handlers[0]
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if h is not handler and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
        if handler not in logger.handlers:
            logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET or logger.level > logging.WARNING:
            logger.setLevel(logging.WARNING)
    return path


_handlers: list[logging.Handler] = []
