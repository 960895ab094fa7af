"""Fault injection for tests: a test hook read only by the trial worker
(:func:`raysearch.train.worker.injected_fault`), never a user setting.

Importing this module (conftest does, before Ray starts) points ``RAYSEARCH_FAULTS_FILE`` at a
session file, so that every Ray worker and every CLI subprocess inherits it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

# The standing rule is conftest's SMALL_SPACE's: every trial with lr 0.03 raises in its first
# epoch; the search must go on. Tests add rules of their own for a while with `inject_faults`.
FAULTS_FILE = os.path.join(tempfile.mkdtemp(prefix="raysearch-faults-"), "faults.json")
os.environ["RAYSEARCH_FAULTS_FILE"] = FAULTS_FILE
STANDING_FAULTS = [{"when": {"lr": 0.03, "arch": "mobilenet_v3_small", "image_size": 32},
                    "epoch": 1, "mode": "raise"}]  # fmt: skip


def _write_faults(rules: list[dict]) -> None:
    tmp = f"{FAULTS_FILE}.tmp"
    with open(tmp, "w") as f:
        json.dump(rules, f)
    os.replace(tmp, FAULTS_FILE)  # a worker never reads half a file


_write_faults(STANDING_FAULTS)


@contextlib.contextmanager
def inject_faults(*rules: dict):
    """Trials whose config matches a rule's ``when`` fail at its ``epoch`` while this is open."""
    _write_faults([*rules, *STANDING_FAULTS])
    try:
        yield
    finally:
        _write_faults(STANDING_FAULTS)
