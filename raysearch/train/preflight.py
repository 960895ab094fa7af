"""Train stage, the checks before ``raysearch train``: the trial config, the data root and the
resources, without torch, Ray or reading the data, so that a mistake fails in a second.
"""

from __future__ import annotations

import dataclasses

from raysearch.cluster import check_resources
from raysearch.config import DataConfig, TrialConfig, load_trial_config, norm_path
from raysearch.data.formats import check_data_root
from raysearch.models.registry import check_weights_file
from raysearch.storage import check_name, check_storage_folder

__all__ = ["load_train_config"]


def load_train_config(
    config_path: str,
    *,
    data_root: str | None = None,
    name: str | None = None,
    storage: str | None = None,
    address: str | None = None,
) -> tuple[TrialConfig, dict, DataConfig]:
    """Read and check a ``raysearch train`` config: ``(trial config, the rest, data config)``.

    ``data_root``, ``name`` and ``storage`` (if given) replace the file's (``rest["name"]`` and
    ``rest["storage"]`` hold the result). Checked in this order, cheapest first: the file, the
    experiment name, the data root (it must exist and hold the dataset's CSVs), and the trial's
    workers against this machine when Ray will be started here.

    Raises :class:`~raysearch.errors.ConfigError` (the file, the name, the resources) or
    :class:`~raysearch.errors.DataError` (the data root), one line naming the key or path.
    """
    cfg, rest = load_trial_config(config_path)
    rest["name"] = check_name(name if name is not None else rest["name"], what="name")
    rest["storage"] = norm_path(storage) if storage else rest["storage"]
    check_storage_folder(rest["storage"], what="storage")
    data = rest["data"]
    if data_root:
        data = dataclasses.replace(data, root=norm_path(data_root))
    check_data_root(data)
    check_resources(rest["resources"], address=address)
    check_weights_file(cfg.weights, arch=cfg.arch)  # a local file: there, before torch loads
    return cfg, rest, data
