"""Old names that saved experiments still use: the one place that maps them to today's code.

Ray pickles raysearch objects into an experiment (``tuner.pkl``, the searcher state, the
experiment state): the searcher and its sampler, the search-space classes, the live view and the
trust callback, the trial driver. Pickles name a class by its module path, and raysearch 0.2 kept
every stage in one flat module (``raysearch.sampler``, ``raysearch.results``, ...). An experiment
saved then must still resume (``tests/fixtures/saved-v0.2``), so those paths keep resolving:

* a module that no longer exists (``MOVED_MODULES``) is served by an alias module whose
  attributes are looked up, in order, in the modules that now hold them;
* a name that left a module that still exists (``MOVED_NAMES``) is found by that module's
  ``__getattr__``, which asks :func:`moved_name`;
* a class that was renamed (``RENAMED``) is found under its old name.

Nothing here is imported eagerly: an alias module imports its targets on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

__all__ = ["MOVED_MODULES", "MOVED_NAMES", "RENAMED", "install", "moved_name"]

# module path in raysearch 0.2 -> the modules that now hold what it held
MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "raysearch.sampler": ("raysearch.search.searcher",),
    "raysearch.results": ("raysearch.search.progress", "raysearch.search.results"),
    "raysearch.tune": ("raysearch.search.tune", "raysearch.search.searcher",
                       "raysearch.search.resources"),
    "raysearch.space": ("raysearch.search.space",),
    "raysearch.asha": ("raysearch.search.scheduler",),
    "raysearch.launch": ("raysearch.train.trainer", "raysearch.cluster", "raysearch.data.prepare"),
}
# (module that still exists, name that left it) -> the module that holds it now
MOVED_NAMES: dict[tuple[str, str], str] = {
    # The search-space classes lived in raysearch.config before 2026-11-23.
    **{("raysearch.config", n): "raysearch.search.space"
       for n in ("Param", "SearchConfig", "SchedulerConfig", "SearchSpace")},
    ("raysearch.train", "train_loop_per_worker"): "raysearch.train.worker",
}
# old class name -> today's name (looked up in the same modules)
RENAMED: dict[str, str] = {
    "RunningBestTPESampler": "MultiFidelityTPESampler",  # before 2026-11-23
}


def moved_name(module: str, name: str):
    """What ``module.name`` refers to now; AttributeError if it never moved."""
    target = MOVED_NAMES.get((module, name))
    if target is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return getattr(importlib.import_module(target), name)


class _Alias(types.ModuleType):
    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name, f"raysearch 0.2's {name}, now in {', '.join(targets)}")
        self.__targets = targets

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        for target in self.__targets:
            module = importlib.import_module(target)
            for candidate in (name, RENAMED.get(name)):
                if candidate and hasattr(module, candidate):
                    return getattr(module, candidate)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED_MODULES:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return _Alias(spec.name, MOVED_MODULES[spec.name])

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    """Serve the old module paths (idempotent); ``raysearch/__init__.py`` calls it."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
