"""Data stage, where a dataset lives: find its folder and check that it is there, with
nothing but the file system (no pandas, torch or ray), so that a wrong ``--data-root`` fails at
once, before anything slow is imported or started.
"""

from __future__ import annotations

from raysearch import storage
from raysearch.errors import DataError

__all__ = ["CHEXPERT_RELEASES", "MURA_CSVS", "check_mura_root", "find_chexpert_root",
           "find_mura_root", "find_nih_csv"]

# The CSVs of a MURA release (data.mura reads them): studies with labels, and image paths.
MURA_CSVS = tuple(f"{split}_{kind}.csv" for split in ("train", "valid")
                  for kind in ("labeled_studies", "image_paths"))


CHEXPERT_RELEASES = ("CheXpert-v1.0-small", "CheXpert-v1.0")
NIH_RELEASE = "ChestX-ray14"  # the folder `demo-data --format nih` writes; a parent may be given


def check_mura_root(root: str) -> str:
    """:func:`find_mura_root`, and every CSV of :data:`MURA_CSVS` is there: what can be known
    about a dataset without reading it. Returns the MURA folder; raises DataError naming the
    first missing file."""
    found = find_mura_root(root)
    fs, path = storage.get_fs(found)
    for name in MURA_CSVS:
        if not fs.exists(f"{path.rstrip('/')}/{name}"):
            raise DataError(f"missing MURA CSV: {storage.join(found, name)}")
    return found


def find_mura_root(root: str) -> str:
    """Return the MURA folder (the one holding ``train_image_paths.csv``) for ``root``.

    ``root`` may be that folder itself or its parent (the folder that holds ``MURA-v1.1``), a
    path or a URL. Raises :class:`~raysearch.errors.DataError` naming ``root`` when it does not
    exist or holds no dataset; reading the CSVs and images is left to the reader.
    """
    fs, path = storage.get_fs(root)
    path = path.rstrip("/")
    if fs.exists(f"{path}/train_image_paths.csv"):
        return _as_given(root)
    for name in ("MURA-v1.1", "MURA-v1.0"):
        if fs.exists(f"{path}/{name}/train_image_paths.csv"):
            return storage.join(_as_given(root), name)
    if not fs.exists(path):
        raise DataError(f"dataset folder does not exist: {root}")
    raise DataError(
        f"no MURA dataset at {root}: expected train_image_paths.csv in it or in {root}/MURA-v1.1"
    )


def _as_given(root: str) -> str:
    return str(root).rstrip("/") if storage.is_url(root) else storage.join(root)


def find_chexpert_root(root: str) -> str:
    """The release folder (the one holding ``train.csv``): ``root`` itself or its
    ``CheXpert-v1.0-small`` / ``CheXpert-v1.0`` folder. DataError naming ``root`` otherwise."""
    fs, path = storage.get_fs(root)
    path = path.rstrip("/")
    if fs.exists(f"{path}/train.csv"):
        return str(root).rstrip("/")
    for name in CHEXPERT_RELEASES:
        if fs.exists(f"{path}/{name}/train.csv"):
            return storage.join(str(root).rstrip("/"), name)
    if not fs.exists(path):
        raise DataError(f"dataset folder does not exist: {root}")
    raise DataError(f"no CheXpert dataset at {root}: expected train.csv in it or in "
                    f"{root}/{CHEXPERT_RELEASES[0]}")


def find_nih_csv(root: str) -> str:
    """The ``Data_Entry_2017*.csv`` of ``root`` or of its ``ChestX-ray14`` folder (the newest
    name when several); DataError naming ``root`` when there is none."""
    fs, path = storage.get_fs(root)
    path = path.rstrip("/")
    if not fs.exists(path):
        raise DataError(f"dataset folder does not exist: {root}")
    for sub in ("", f"/{NIH_RELEASE}"):
        found = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{path}{sub}/Data_Entry_2017*.csv"))
        if found:
            return storage.join(str(root).rstrip("/") + sub, found[-1])
    raise DataError(f"no ChestX-ray14 dataset at {root}: expected Data_Entry_2017*.csv in it or "
                    f"in {root}/{NIH_RELEASE}")
