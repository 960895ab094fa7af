"""Old module paths that saved experiments pickle raysearch objects by (raysearch._compat): every
entry of the mapping resolves, and objects pickled under an old path load as today's objects.
The whole-experiment case (a search saved by 0.2, resumed) is in search/test_tune.py."""

from __future__ import annotations

import importlib
import pickle

import pytest

from raysearch import _compat
from raysearch.search.space import load_search_space


@pytest.mark.parametrize("old", sorted(_compat.MOVED_MODULES))
def test_every_moved_module_still_imports(old):
    module = importlib.import_module(old)
    for target in _compat.MOVED_MODULES[old]:
        importlib.import_module(target)  # every target exists
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


# What raysearch 0.2 pickled into experiments, by the module path it had then.
PICKLED_IN_0_2 = [
    ("raysearch.sampler", "MultiFidelitySearch"),
    ("raysearch.sampler", "MultiFidelityTPESampler"),
    ("raysearch.sampler", "RunningBestTPESampler"),
    ("raysearch.results", "SearchProgress"),
    ("raysearch.results", "TrustCallback"),
    ("raysearch.tune", "DefineByRun"),
    ("raysearch.space", "Param"),
    ("raysearch.space", "SearchSpace"),
    ("raysearch.launch", "tune_trial_driver"),
    ("raysearch.config", "Param"),
    ("raysearch.config", "SearchSpace"),
    ("raysearch.config", "SearchConfig"),
    ("raysearch.config", "SchedulerConfig"),
    ("raysearch.train", "train_loop_per_worker"),
]


@pytest.mark.parametrize(("module", "name"), PICKLED_IN_0_2)
def test_names_pickled_by_0_2_resolve_to_todays_objects(module, name):
    obj = getattr(importlib.import_module(module), name)
    assert obj.__module__.startswith(("raysearch.search.", "raysearch.train."))


def test_a_search_space_pickled_under_its_old_paths_loads():
    spec = load_search_space("search_spaces/mura.yaml")
    new = pickle.dumps(spec, protocol=0)
    for old_module in (b"raysearch.space", b"raysearch.config"):
        old = new.replace(b"raysearch.search.space\n", old_module + b"\n")
        assert old != new and b"raysearch.search.space" not in old
        assert pickle.loads(old) == spec
