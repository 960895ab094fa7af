"""The package layout: every module imports, and every name a module or stage package exports
(``__all__``) resolves, so a name moved between modules cannot silently go missing."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import raysearch

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(raysearch.__path__, prefix="raysearch.")
)


@pytest.mark.parametrize("name", MODULES)
def test_every_exported_name_resolves(name):
    module = importlib.import_module(name)
    missing = [n for n in getattr(module, "__all__", ()) if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names {missing}, which it does not define"


def test_the_tree_is_the_pipeline():
    stages = {m.name for m in pkgutil.iter_modules(raysearch.__path__) if m.ispkg}
    assert stages == {"data", "models", "train", "search", "ensemble", "inference", "evaluation",
                      "report", "bench", "experiment", "serve", "explain"}
