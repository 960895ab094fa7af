"""Search stage, the checks before a search: everything about ``raysearch tune`` that can be
known without torch, Ray or reading the data, so that a wrong data root or a trial too big for
the machine fails in a second, not minutes later inside Ray. Imports nothing heavy.
"""

from __future__ import annotations

from raysearch.cluster import check_resources
from raysearch.data.formats import check_data_root
from raysearch.errors import ConfigError
from raysearch.search.space import SearchSpace
from raysearch.storage import check_storage_folder, exists, join

__all__ = ["preflight_search"]


def preflight_search(
    spec: SearchSpace, *, resume: bool = False, overwrite: bool = False,
    address: str | None = None,
) -> None:
    """Check ``spec`` against the world before anything slow: with ``resume``, there is an
    experiment to resume; the dataset folder exists and holds the dataset's CSVs (unless the
    experiment already has its manifest, which is what a resumed search reads); and one trial's
    workers fit this machine when Ray will be started here.

    Raises :class:`~raysearch.errors.ConfigError` for ``resume`` and the resources and
    :class:`~raysearch.errors.DataError` for the data root, each one line naming the setting.
    """
    check_storage_folder(spec.storage, what="storage")
    if resume and not exists(join(spec.experiment_dir, "experiment.json")):
        raise ConfigError(f"--resume: no experiment to resume at {spec.experiment_dir}")
    has_manifest = not overwrite and exists(join(spec.experiment_dir, "manifest.parquet"))
    if not has_manifest:
        check_data_root(spec.data)
    check_resources(spec.resources, address=address)
