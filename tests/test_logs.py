"""Ray's messages to the driver (worker-start warnings) and colour codes stay out of the terminal
and out of the log file's text unless -v."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest

from raysearch import logs

RAYLET = ("\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: "
          "6d6b with address: 192.0.2.2, which is 4x the maximum expected startup concurrency (2).")


@pytest.fixture
def quiet(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSEARCH_LOG_DIR", str(tmp_path))
    monkeypatch.setattr(logs, "_state", {"path": None})
    monkeypatch.setattr(logs, "_handlers", [])
    names = (*logs.LIBRARY_LOGGERS, "py.warnings")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names}
    try:
        yield logs.quiet_libraries(command="tune")
    finally:
        logging.captureWarnings(False)
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate


def test_the_raylets_worker_start_warning_goes_to_the_log_without_colour(quiet, capsys):
    printed = []
    worker = types.SimpleNamespace(print_to_stdstream=lambda data, ignore_prefix: printed.append(data))
    logs.quiet_ray_driver(worker)
    # What ray._private.worker.listen_error_messages does with each message it receives:
    worker.print_to_stdstream({"lines": [RAYLET], "pid": "raylet", "is_err": False},
                              ignore_prefix=False)
    for h in logs._handlers:
        h.flush()
    out = capsys.readouterr()
    assert printed == [] and out.out == "" and out.err == ""
    text = Path(quiet).read_text()
    assert "8 PYTHON worker processes have been started" in text
    assert "\x1b" not in text


def test_colour_codes_never_reach_the_log_file(quiet):
    logging.getLogger("ray").warning("\x1b[31mRuntimeError\x1b[0m: CUDA error")
    for h in logs._handlers:
        h.flush()
    text = Path(quiet).read_text()
    assert "RuntimeError: CUDA error" in text and "\x1b" not in text
    assert logs.strip_ansi("\x1b[1;33mwarn\x1b[0m \x1b[2Kdone") == "warn done"
