"""Data stage, the csv reader: any labelled image dataset from one manifest file.

``data.root`` is a CSV or Parquet file (path or URL) with one row per image. Columns, named by
options (``data.*_column``) or found by their default names:

    path     (path, image_path, image)   the image, relative to the file's folder, or absolute
                                         (a path or URL)
    patient  (patient_id, patient)       required: the split keeps a patient's images together
    study    (study_id, study)           optional; default: each image is its own study
    group    (group)                     optional; per-group metrics (default: one group "all")
    split    (split)                     optional; train, val or test per row
    labels                               ``data.labels`` names them; ``all``: every other column

A label is 1 (positive), 0 (negative), or -1 / empty (uncertain / unknown), as CheXpert writes
them; the label policies (:mod:`raysearch.data.labels`) decide what is trained on ("Sick",
any_finding, looks at the chosen label columns but "No Finding" and "Support Devices"). Validated as
MURA is: missing files, images listed twice, label values outside 1/0/-1/empty, and the images
of one study disagreeing on the patient or the labels are each named in one DataError line
(or left out with ``skip_bad``). A split column that puts one patient in two splits is refused.
"""

from __future__ import annotations

import io
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from raysearch import storage
from raysearch.data.labels import raw_column
from raysearch.data.reader import (
    Problems,
    check_missing,
    check_patients_in_one_split,
    check_studies_agree,
    finish,
    list_files,
)
from raysearch.errors import ConfigError, DataError, os_reason

__all__ = ["COLUMN_DEFAULTS", "read_csv_manifest", "read_table"]

COLUMN_DEFAULTS = {
    "path": ("path", "image_path", "image"),
    "patient": ("patient_id", "patient"),
    "study": ("study_id", "study"),
    "group": ("group",),
    "split": ("split",),
}
REQUIRED = ("path", "patient")
SPLITS = ("train", "val", "test")


def read_table(uri: str) -> pd.DataFrame:
    """A CSV (every cell text, empty cells "") or Parquet file; DataError when unreadable."""
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        raise DataError(f"manifest file does not exist: {uri}") from None
    except IsADirectoryError:
        raise DataError(f"{uri} is a folder; the csv format reads one CSV or Parquet file "
                        "(or name the format: --format mura|chexpert|nih)") from None
    except OSError as e:
        raise DataError(f"cannot read {uri}: {os_reason(e)}") from None
    try:
        if raw[:4] == b"PAR1":
            return pd.read_parquet(io.BytesIO(raw))
        return pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError,
            ValueError, OSError) as e:
        raise DataError(f"cannot parse {uri}: {str(e).splitlines()[0]}") from None


def _column(table: pd.DataFrame, data, role: str) -> str | None:
    given = getattr(data, f"{role}_column")
    if given is not None:
        if given not in table.columns:
            raise ConfigError(f"data.{role}_column: no column {given!r} in the manifest; its "
                              f"columns: {', '.join(map(str, table.columns))}")
        return given
    found = next((c for c in COLUMN_DEFAULTS[role] if c in table.columns), None)
    if found is None and role in REQUIRED:
        raise DataError(f"the manifest has no {role} column ({' or '.join(COLUMN_DEFAULTS[role])}); "
                        f"name it with data.{role}_column; its columns: "
                        f"{', '.join(map(str, table.columns))}")
    return found


def _codes(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Label cells -> raw codes (1, 0, -1, NaN for empty) and a mask of the cells that are none
    of these."""
    text = values.astype(object).where(values.notna(), "").astype(str).str.strip()
    num = pd.to_numeric(text.where(text != "", "nan"), errors="coerce").to_numpy(np.float64, copy=True)
    bad = (~np.isin(num, (1.0, 0.0, -1.0)) & ~np.isnan(num)) | (np.isnan(num)
                                                                & ~text.isin(["", "nan", "NaN"])
                                                                .to_numpy())
    num[bad] = np.nan
    return num, bad


def read_csv_manifest(root: str, data, *, check_files: bool = True):
    """Read the manifest file ``root`` (see the module docstring) into the manifest and the task
    (name ``csv``, aggregation mean unless ``data.aggregation``). Raises DataError / ConfigError,
    one line naming the file, column, row or study."""
    table = read_table(root)
    if table.empty:
        raise DataError(f"the manifest {root} has no rows")
    table.columns = [str(c) for c in table.columns]
    cols = {role: _column(table, data, role) for role in COLUMN_DEFAULTS}
    taken = {c for c in cols.values() if c is not None}
    if isinstance(data.labels, str):
        if data.labels == "competition":
            raise ConfigError("data.labels: a csv manifest has no competition labels; use all "
                              "or a list")
        labels = tuple(c for c in table.columns if c not in taken)
    else:
        unknown = [x for x in data.labels if x not in table.columns and x != "Sick"]
        if unknown:
            raise ConfigError(f"data.labels: no label column {unknown[0]!r} in {root}; its "
                              f"columns: {', '.join(table.columns)}")
        labels = tuple(x for x in data.labels if x != "Sick")
    if not labels:
        raise DataError(f"the manifest {root} has no label columns besides "
                        f"{', '.join(sorted(taken))}")
    problems = Problems("csv", root)
    base = root.rsplit("/", 1)[0] if storage.is_url(root) else os.path.dirname(
        os.path.abspath(os.path.expanduser(root)))

    paths = table[cols["path"]].astype(str).str.strip()
    frame = pd.DataFrame({
        "rel": paths,
        "patient_id": table[cols["patient"]].astype(str).str.strip(),
    })
    frame["image_path"] = [_resolve(base, p) for p in paths]
    frame["study_id"] = (table[cols["study"]].astype(str).str.strip() if cols["study"]
                         else frame["rel"])
    group = cols["group"] or "group"
    frame[group] = table[cols["group"]].astype(str) if cols["group"] else "all"
    has_split = cols["split"] is not None
    if has_split and data.test_fraction is not None:
        raise ConfigError(f"data.test_fraction and the split column {cols['split']!r} both "
                          "split the data; remove one")
    if has_split:
        split = table[cols["split"]].astype(str).str.strip().str.lower()
        bad = ~split.isin(SPLITS)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{root}: column {cols['split']!r} row {i + 2} is "
                            f"{table[cols['split']].iat[i]!r}; allowed: {', '.join(SPLITS)}")
        frame["official_split"] = split.to_numpy()
        check_patients_in_one_split(frame, "official_split", where=f"{root} ({cols['split']})")
    else:
        frame["official_split"] = "train"
    for name in labels:
        codes, bad = _codes(table[name])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{root}: label column {name!r} row {i + 2} has value "
                            f"{table[name].iat[i]!r}; a label is 1, 0, -1 or empty"
                            + (" (or list the label columns in data.labels)"
                               if data.labels == "all" else ""))
        frame[raw_column(name)] = codes

    empty = frame["rel"].isin(["", "nan"]) | frame["patient_id"].isin(["", "nan"])
    problems.add(np.flatnonzero(empty.to_numpy()) + 2, "row without an image path or patient")
    frame = frame.loc[~empty].reset_index(drop=True)
    dup = frame["image_path"].duplicated()
    problems.add(frame.loc[dup, "rel"], "image listed more than once")
    frame = frame.loc[~dup].reset_index(drop=True)
    if check_files:
        frame = _check_files(frame, base, problems)
    frame = check_studies_agree(frame, ["patient_id"], problems,
                                reason="study's images name different patients")
    frame = check_studies_agree(frame, [raw_column(x) for x in labels], problems,
                                reason="study's images disagree on the labels")
    return finish(frame, data, available=labels, name="csv", group=group, groups=(),
                  aggregation="mean", problems=problems,
                  has_official_test=has_split)


def _resolve(base: str, path: str) -> str:
    """A manifest's image path: a URL or absolute path as it is; a relative one below the
    manifest's folder (``..`` resolved, for local folders and URLs alike)."""
    if storage.is_url(path) or os.path.isabs(path):
        return path
    if storage.is_url(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path))}"
    return os.path.normpath(os.path.join(base, path))


def _below(path: str) -> bool:
    """A relative path that stays below the manifest's folder (one listing finds it)."""
    return not (storage.is_url(path) or os.path.isabs(path)
                or posixpath.normpath(path).startswith(".."))


def _check_files(frame: pd.DataFrame, base: str, problems: Problems) -> pd.DataFrame:
    relative = frame["rel"].map(_below)
    rel, other = frame.loc[relative], frame.loc[~relative]
    if len(rel):
        files = list_files(base)
        rel = rel.assign(rel=rel["rel"].map(posixpath.normpath))
        rel = check_missing(rel, files, problems)
    if len(other):
        with ThreadPoolExecutor(16) as pool:
            there = list(pool.map(storage.exists, other["image_path"]))
        problems.add(other.loc[~np.array(there), "rel"], "image listed but missing")
        other = other.loc[np.array(there)]
    return pd.concat([rel, other], ignore_index=True)
