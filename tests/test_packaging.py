"""Packaging: pyproject.toml as setuptools reads it. The shipped search spaces and trial configs
are package data (a non-editable install has them), and the metadata raises no deprecation
warning on `pip install` (the `project.license` table did)."""

from __future__ import annotations

import fnmatch
import os
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_pyproject_ships_the_spaces_and_configs_without_warnings(monkeypatch):
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(REPO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), "pyproject.toml")
    messages = [str(w.message).splitlines()[0] for w in caught]
    assert not [m for m in messages if "deprecat" in m.lower()], messages
    assert dist.metadata.license_expression == "Apache-2.0"
    assert all((REPO / f).is_file() for f in dist.metadata.license_files or ["LICENSE"])

    patterns = dist.package_data["raysearch"]
    shipped = [
        os.path.relpath(os.path.join(folder, name), REPO / "raysearch")
        for sub in ("search_spaces", "configs")
        for folder, _, names in os.walk(REPO / "raysearch" / sub)
        for name in names
    ]
    assert {"search_spaces/demo.yaml", "search_spaces/mura.yaml",
            "configs/demo_trial.yaml"} <= set(shipped)
    unshipped = [f for f in shipped if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert not unshipped, f"not package data: {unshipped}"
    # The repository's paths, used by the README and scripts, still lead to the same files.
    assert (REPO / "search_spaces" / "mura.yaml").resolve() == (
        REPO / "raysearch" / "search_spaces" / "mura.yaml")
