"""Logging: quiet by default. Libraries' logs go to a file; the terminal gets raysearch's own lines.

Ray logs an ERROR traceback for every failed or retried trial, and gcsfs a long traceback for
every retry of an unreachable bucket. Unless ``-v``, those loggers write to a log file instead
(``$RAYSEARCH_LOG_DIR``, default ``~/.cache/raysearch/logs/``), and raysearch's one-line errors
name that file. This module never imports ray.
"""

from __future__ import annotations

import logging
import os
import re
import time

__all__ = ["LIBRARY_LOGGERS", "log_path", "quiet_libraries", "quiet_ray_driver", "strip_ansi"]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour and cursor codes (``ESC [ ... m`` and the like)."""
    return _ANSI.sub("", text)


class _StripAnsi(logging.Filter):
    """Log files get plain text: Ray and torch put colour codes into their messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\x1b" in message:
            record.msg, record.args = strip_ansi(message), None
        return True

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
        handler.addFilter(_StripAnsi())
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
    logging.captureWarnings(True)  # Python warnings from libraries: to the file as well
    for name in ("py.warnings",):
        logger = logging.getLogger(name)
        if handler not in logger.handlers:
            logger.addHandler(handler)
        logger.propagate = False
    return path


def raylet_message_to_log(data: dict, ignore_prefix: bool = False) -> None:
    """Stands in for ``ray._private.worker.print_to_stdstream`` in the driver's thread that
    prints the messages the raylet sends every driver ("(raylet) WARNING: 8 PYTHON worker
    processes have been started ..., 4x the maximum expected startup concurrency"): they go to
    the log file, without colour codes, instead of into the live view. ``data``: Ray's
    ``{"lines": [...], "pid": ..., "is_err": ...}``."""
    logger = logging.getLogger("ray")
    for line in data.get("lines") or ():
        logger.warning("(%s) %s", data.get("pid", "raylet"), strip_ansi(str(line)))


def quiet_ray_driver(worker_module) -> None:
    """Route the raylet's messages to the driver (Ray starts a thread for them in every
    ``ray.init`` and offers no switch) to the log file: ``worker_module`` is
    ``ray._private.worker``, whose ``listen_error_messages`` looks ``print_to_stdstream`` up at
    each message. The workers' own output (``log_to_driver``) is not affected: it holds the
    original function. Call :func:`quiet_libraries` first; ``-v`` leaves Ray as it is."""
    if getattr(worker_module, "print_to_stdstream", None) is not None:
        worker_module.print_to_stdstream = raylet_message_to_log


_handlers: list[logging.Handler] = []
