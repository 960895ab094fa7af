"""Search stage, the checks before a search: everything about ``raysearch tune`` that can be
known without torch, Ray or reading the data, so that a wrong data root or a trial too big for
the machine fails in a second, not minutes later inside Ray. Imports nothing heavy.
"""

from __future__ import annotations

from raysearch.cluster import check_resources
from raysearch.config import TrialConfig
from raysearch.data.formats import check_data_root
from raysearch.errors import ConfigError
from raysearch.models.registry import check_weights_file
from raysearch.search.space import SearchSpace
from raysearch.storage import check_storage_folder, exists, join

__all__ = ["preflight_search", "trial_values", "weight_sources"]


def preflight_search(
    spec: SearchSpace, *, resume: bool = False, overwrite: bool = False,
    address: str | None = None,
) -> None:
    """Check ``spec`` against the world before anything slow: with ``resume``, there is an
    experiment to resume; the dataset folder exists and holds the dataset's CSVs (unless the
    experiment already has its manifest, which is what a resumed search reads); and one trial's
    workers fit this machine when Ray will be started here; every weights file a trial may ask
    for is there (a local path; downloads and buckets are checked once torch is loaded).

    Raises :class:`~raysearch.errors.ConfigError` for ``resume`` and the resources,
    :class:`~raysearch.errors.DataError` for the data root and
    :class:`~raysearch.errors.WeightsError` for a weights file, each one line naming it.
    """
    check_storage_folder(spec.storage, what="storage")
    if resume and not exists(join(spec.experiment_dir, "experiment.json")):
        raise ConfigError(f"--resume: no experiment to resume at {spec.experiment_dir}")
    has_manifest = not overwrite and exists(join(spec.experiment_dir, "manifest.parquet"))
    if not has_manifest:
        check_data_root(spec.data)
    check_resources(spec.resources, address=address)
    for arch, weights in sorted(weight_sources(spec)):  # a local file: there, before torch loads
        check_weights_file(weights, arch=arch)


def trial_values(spec: SearchSpace, name: str) -> set[str]:
    """Every value a categorical trial setting may take in ``spec`` (the default if unset)."""
    for p in spec.space:
        if p.name == name and p.kind in ("choice", "constant"):
            return {str(v) for v in p.values}
    default = TrialConfig.__dataclass_fields__[name].default
    return {str(spec.trial.get(name, default))}


def weight_sources(spec: SearchSpace) -> set[tuple[str, str]]:
    """Every (arch, weights) pair a trial of ``spec`` may ask for."""
    return {(a, w) for a in trial_values(spec, "arch") for w in trial_values(spec, "weights")}
