"""Data stage, the nih reader: ChestX-ray14 (Wang et al., CVPR 2017).

The folder holds ``Data_Entry_2017*.csv`` (the newest when several: ``_v2020`` over the 2017
file) with ``Image Index``, ``Finding Labels`` (``|``-separated, or ``No Finding``),
``Follow-up #``, ``Patient ID`` and ``View Position``. Its last two header names,
``OriginalImage[Width,Height]`` and ``OriginalImagePixelSpacing[x,y]``, hold commas and split into
four columns when read as plain CSV, which the rows match; the 2017 file also ends every line with
an empty column. Both are handled. Images live in ``images/``, in the root itself, or in the
``images_NNN/images/`` folders of the download. ``train_val_list.txt`` and ``test_list.txt``,
when there, are the official patient-wise split (test_list: the official test set).

Labels are image-level (text-mined from reports): 1 when named in Finding Labels, else 0, so
there are no uncertain or blank values. Each image is its own study. The task's group is
``view`` (PA or AP); the aggregation max, as for CheXpert.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from raysearch import storage
from raysearch.data.labels import raw_column
from raysearch.data.reader import (
    Problems,
    check_missing,
    check_patients_in_one_split,
    finish,
    list_files,
    read_csv_text,
)
from raysearch.data.roots import find_nih_csv
from raysearch.errors import ConfigError, DataError, name_some

__all__ = ["NIH_COMPETITION", "NIH_LABELS", "find_nih_csv", "read_nih", "read_nih_csv"]

NIH_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)  # fmt: skip
# CheXpert's competition five, named the NIH way (Pleural Effusion is Effusion here).
NIH_COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion")
NO_FINDING = "No Finding"
VIEWS = ("PA", "AP")
REQUIRED = ("Image Index", "Finding Labels", "Patient ID", "View Position")
_IMAGE_DIR_RE = re.compile(r"^(?:images_\d+/)?(?:images/)?[^/]+\.png$", re.IGNORECASE)


def read_nih_csv(source, *, name: str = "Data_Entry_2017.csv") -> pd.DataFrame:
    """``Data_Entry_2017*.csv`` (path, URL or bytes; gzip too) -> a frame with ``image_index``,
    ``patient_id``, ``follow_up``, ``view`` and ``raw_<slug>`` per NIH label (1/0). Raises
    DataError naming the row of an unknown finding or a missing column."""
    table = read_csv_text(source, name=name)
    table = _fix_header(table)
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise DataError(f"{name} is not a ChestX-ray14 Data_Entry CSV: no column {missing[0]!r}")
    findings = table["Finding Labels"].str.strip().str.split("|")
    known = {*NIH_LABELS, NO_FINDING}
    for i, names in enumerate(findings):
        unknown = [x for x in names if x.strip() not in known]
        if unknown or (NO_FINDING in names and len(names) > 1):
            what = (f"unknown finding {unknown[0]!r}" if unknown
                    else "No Finding together with findings")
            raise DataError(f"{name} row {i + 2} ({table['Image Index'].iat[i]}): {what}; "
                            f"the labels are {', '.join(NIH_LABELS)} or {NO_FINDING}")
    frame = pd.DataFrame({
        "image_index": table["Image Index"].str.strip(),
        "patient_id": table["Patient ID"].str.strip().str.lstrip("0").replace("", "0"),
        "follow_up": table.get("Follow-up #", pd.Series("", index=table.index)).str.strip(),
        "view": table["View Position"].str.strip().str.upper(),
    })
    sets = [{x.strip() for x in names} for names in findings]
    for label in NIH_LABELS:
        frame[raw_column(label)] = np.array([label in s for s in sets], dtype=np.float64)
    return frame


def _fix_header(table: pd.DataFrame) -> pd.DataFrame:
    """Name the columns the bracketed header names split into, and drop the trailing empty
    column of the 2017 file."""
    renames = {"OriginalImage[Width": "original_width", "Height]": "original_height",
               "OriginalImagePixelSpacing[x": "pixel_spacing_x", "y]": "pixel_spacing_y"}
    table = table.rename(columns={c: renames.get(c.strip(), c.strip()) for c in table.columns})
    empty = [c for c in table.columns if c.startswith("Unnamed:") and (table[c] == "").all()]
    return table.drop(columns=empty)


def read_nih(root: str, data, *, check_files: bool = True):
    """Read a ChestX-ray14 folder (see the module docstring) into the manifest and the task."""
    if data.views == "lateral":
        raise ConfigError("data.views: ChestX-ray14 has frontal views only (PA and AP)")
    csv_uri = find_nih_csv(root)
    root = csv_uri.rsplit("/", 1)[0]
    frame = read_nih_csv(csv_uri, name=csv_uri.rsplit("/", 1)[-1])
    problems = Problems("ChestX-ray14", root)
    dup = frame["image_index"].duplicated()
    problems.add(frame.loc[dup, "image_index"], "image listed more than once")
    frame = frame.loc[~dup].reset_index(drop=True)

    files = list_files(root)
    where: dict[str, list[str]] = {}
    for rel in files:
        if _IMAGE_DIR_RE.match(rel):
            where.setdefault(rel.rsplit("/", 1)[-1], []).append(rel)
    twice = sorted(k for k, v in where.items() if len(v) > 1)
    if twice:
        raise DataError(f"{len(twice)} ChestX-ray14 image(s) are in more than one images "
                        f"folder of {root}: {name_some([where[k][0] for k in twice])}")
    frame["rel"] = [where.get(i, [f"images/{i}"])[0] for i in frame["image_index"]]
    if check_files:
        frame = check_missing(frame, files, problems)

    has_test = "test_list.txt" in files
    frame["official_split"] = "train"
    if has_test:
        test = _read_list(root, "test_list.txt")
        frame.loc[frame["image_index"].isin(test), "official_split"] = "test"
        check_patients_in_one_split(frame, "official_split",
                                    where=f"{root} (train_val_list.txt and test_list.txt)")
    frame["study_id"] = frame["image_index"].str.rsplit(".", n=1).str[0]
    frame["image_path"] = [storage.join(root, rel) for rel in frame["rel"]]
    return finish(frame, data, available=NIH_LABELS, name="nih", group="view", groups=VIEWS,
                  aggregation="max", problems=problems, competition=NIH_COMPETITION,
                  has_official_test=has_test)


def _read_list(root: str, name: str) -> set[str]:
    try:
        text = storage.read_bytes(storage.join(root, name)).decode()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {storage.join(root, name)}: {e}") from None
    return {line.strip() for line in text.splitlines() if line.strip()}
