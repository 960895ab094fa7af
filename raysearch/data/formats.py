"""Data stage, dataset formats: which reader a root needs (``data.format``, or detected), and
what can be checked about a root with the file system alone, before anything slow starts.

* ``mura``: a MURA-v1.1 folder or its parent (``train_image_paths.csv``);
* ``chexpert``: a CheXpert-v1.0(-small) folder or its parent (``train.csv`` with ``Path``);
* ``nih``: a ChestX-ray14 folder (``Data_Entry_2017*.csv``);
* ``csv``: a CSV or Parquet manifest file.
"""

from __future__ import annotations

from raysearch import storage
from raysearch.errors import DataError

__all__ = ["FORMATS", "check_data_root", "detect_format", "resolve_format"]

FORMATS = ("mura", "chexpert", "nih", "csv")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq", ".csv.gz")


def detect_format(root: str) -> str:
    """The format of the dataset at ``root`` (see the module docstring). DataError when the
    root does not exist or looks like none of them, naming what was looked for."""
    fs, path = storage.get_fs(root)
    path = path.rstrip("/")
    if fs.isfile(path):
        if path.lower().endswith(TABLE_SUFFIXES):
            return "csv"
        raise DataError(f"{root} is a file but not a CSV or Parquet manifest")
    if not fs.exists(path):
        raise DataError(f"dataset folder does not exist: {root}")
    for sub in ("", "/MURA-v1.1", "/MURA-v1.0"):
        if fs.exists(f"{path}{sub}/train_image_paths.csv"):
            return "mura"
    for sub in ("", "/CheXpert-v1.0-small", "/CheXpert-v1.0"):
        if fs.exists(f"{path}{sub}/train.csv"):
            return "chexpert"
    if fs.glob(f"{path}/Data_Entry_2017*.csv") or fs.glob(f"{path}/ChestX-ray14/Data_Entry_2017*.csv"):
        return "nih"
    raise DataError(
        f"cannot tell the dataset format of {root}: no MURA train_image_paths.csv, CheXpert "
        "train.csv or NIH Data_Entry_2017*.csv in it; give data.format (--format) or point "
        "data.root at a CSV/Parquet manifest"
    )


def resolve_format(data) -> str:
    """``data.format``, or the detected one when it is ``auto``."""
    return detect_format(data.root) if data.format == "auto" else data.format


def check_data_root(data) -> str:
    """What can be known about ``data.root`` without reading the dataset: the format's files
    are there. Returns the format; raises DataError naming the first missing thing."""
    fmt = resolve_format(data)
    if fmt == "mura":
        from raysearch.data.roots import check_mura_root

        check_mura_root(data.root)
    elif fmt == "chexpert":
        from raysearch.data.roots import find_chexpert_root

        find_chexpert_root(data.root)
    elif fmt == "nih":
        from raysearch.data.roots import find_nih_csv

        find_nih_csv(data.root)
    else:
        fs, path = storage.get_fs(data.root)
        if not fs.isfile(path):
            raise DataError(f"data.format csv needs a CSV or Parquet manifest file; "
                            f"{data.root} is {'a folder' if fs.exists(path) else 'not there'}")
    return fmt


def read_any(data, *, check_files: bool = True):
    """Read ``data`` with its format's reader: (manifest, task). MURA goes through
    :func:`raysearch.data.prepare.read_dataset`'s own path; this is for the other formats."""
    fmt = resolve_format(data)
    _check_options(data, fmt)
    if fmt == "chexpert":
        from raysearch.data.chexpert import read_chexpert

        return read_chexpert(data.root, data, check_files=check_files)
    if fmt == "nih":
        from raysearch.data.nih import read_nih

        return read_nih(data.root, data, check_files=check_files)
    if fmt == "csv":
        from raysearch.data.manifest_csv import read_csv_manifest

        return read_csv_manifest(data.root, data, check_files=check_files)
    raise DataError(f"read_any reads chexpert, nih and csv, not {fmt}")


_COLUMNS = ("path_column", "patient_column", "study_column", "group_column", "split_column")


def _check_options(data, fmt: str) -> None:
    """An option set for another format is refused by name, not silently ignored."""
    from raysearch.errors import ConfigError

    foreign = {"chexpert": _COLUMNS, "nih": _COLUMNS, "csv": ("views",)}.get(fmt, ())
    for name in data.reader_options():
        if name in foreign:
            raise ConfigError(f"data.{name} does not apply to the {fmt} format")
