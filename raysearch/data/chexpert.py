"""Data stage, the chexpert reader: CheXpert-v1.0 and CheXpert-v1.0-small (Irvin et al. 2019,
arXiv:1901.07031).

The release folder holds ``train.csv`` and ``valid.csv``: ``Path, Sex, Age, Frontal/Lateral,
AP/PA`` and the 14 observations, each 1.0, 0.0, -1.0 (uncertain) or blank (not mentioned). Paths
read ``CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyN/viewN_{frontal,lateral}.jpg``; some
copies strip the release folder, and both are accepted. The patient and the study come from the
path; every view of a study must carry the study's labels (checked).

Manifest columns (see :mod:`raysearch.data.reader` for the rest): ``view`` (frontal or lateral,
the task's group), ``ap_pa`` (AP, PA, LL, RL or empty), ``official_split`` (train, or test for
valid.csv), ``raw_<slug>`` and ``label_<slug>`` per label. The task: the chosen labels, a
study's probability the max of its views' (the CheXpert paper, sec. 4), metrics per view.
"""

from __future__ import annotations

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
    read_csv_text,
)
from raysearch.data.roots import find_chexpert_root
from raysearch.errors import DataError

__all__ = ["CHEXPERT_LABELS", "COMPETITION_LABELS", "find_chexpert_root", "read_chexpert",
           "read_chexpert_csv"]

CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)  # fmt: skip
# The CheXpert competition's five (the paper, sec. 5).
COMPETITION_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
META_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
VIEWS = ("frontal", "lateral")
_PATH_RE = (r"^(?:[^/]+/)?(?P<official>train|valid)/(?P<patient>patient\d+)/(?P<study>study\d+)/"
            r"(?P<image>view\d+_(?P<view>frontal|lateral)\.jpg)$")


def read_chexpert_csv(source, *, name: str = "train.csv", official: str = "train") -> pd.DataFrame:
    """One CheXpert CSV (a path, URL, or bytes; gzip is read too) -> a frame with ``rel``,
    ``official_split``, ``patient_id``, ``study_id``, ``view``, ``ap_pa``, ``csv_row`` and
    ``raw_<slug>`` per observation. Raises DataError naming the file, row and column of a
    missing column, a path that is not CheXpert's or a label that is not 1, 0, -1 or blank."""
    table = read_csv_text(source, name=name)
    missing = [c for c in (*META_COLUMNS[:1], "Frontal/Lateral", *CHEXPERT_LABELS)
               if c not in table.columns]
    if missing:
        raise DataError(f"{name} is not a CheXpert CSV: no column {missing[0]!r}; expected "
                        f"{', '.join(META_COLUMNS)} and the 14 observations")
    parts = table["Path"].str.strip().str.extract(_PATH_RE)
    bad_path = parts["official"].isna()
    if bad_path.any():
        i = int(np.flatnonzero(bad_path.to_numpy())[0])
        raise DataError(f"{name} row {i + 2}: {table['Path'].iat[i]!r} is not a CheXpert image "
                        "path ([release/]train|valid/patientN/studyN/viewN_frontal|lateral.jpg)")
    wrong = parts["official"] != official
    if wrong.any():
        i = int(np.flatnonzero(wrong.to_numpy())[0])
        raise DataError(f"{name} row {i + 2}: {table['Path'].iat[i]!r} is not under {official}/")
    frame = pd.DataFrame({
        "rel": parts["official"] + "/" + parts["patient"] + "/" + parts["study"] + "/"
               + parts["image"],
        "official_split": "test" if official == "valid" else "train",
        "patient_id": parts["patient"],
        "study_id": parts["official"] + "/" + parts["patient"] + "/" + parts["study"],
        "view": parts["view"],
        "ap_pa": table["AP/PA"].str.strip() if "AP/PA" in table.columns else "",
        "csv_row": np.arange(len(table)) + 2,
    })
    fl = table["Frontal/Lateral"].str.strip().str.lower()
    disagree = fl != frame["view"]
    if disagree.any():
        i = int(np.flatnonzero(disagree.to_numpy())[0])
        raise DataError(f"{name} row {i + 2}: Frontal/Lateral is {table['Frontal/Lateral'].iat[i]!r}"
                        f" but the file is a {frame['view'].iat[i]} view")
    for label in CHEXPERT_LABELS:
        text = table[label].str.strip()
        codes = pd.to_numeric(text.where(text != "", "nan"), errors="coerce").to_numpy(np.float64)
        bad = ~(np.isin(codes, (1.0, 0.0, -1.0)) | (text == "").to_numpy())
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{name} row {i + 2}: {label} is {table[label].iat[i]!r}; CheXpert "
                            "labels are 1.0, 0.0, -1.0 or blank")
        frame[raw_column(label)] = codes
    return frame


def read_chexpert(root: str, data, *, check_files: bool = True):
    """Read a CheXpert release (see the module docstring) into the manifest and the task.

    ``data`` (a DataConfig) gives the views, labels, policies and split; valid.csv, when there,
    is the official test set. Every problem is one DataError line (or, with ``data.skip_bad``,
    left out and listed in ``manifest.attrs["skipped"]``).
    """
    root = find_chexpert_root(root)
    fs, root_path = storage.get_fs(root)
    frames = [read_chexpert_csv(storage.join(root, "train.csv"), name="train.csv")]
    has_valid = fs.exists(f"{root_path.rstrip('/')}/valid.csv")
    if has_valid:
        frames.append(read_chexpert_csv(storage.join(root, "valid.csv"), name="valid.csv",
                                        official="valid"))
    frame = pd.concat(frames, ignore_index=True)
    check_patients_in_one_split(frame, "official_split", where=f"{root} (train.csv and valid.csv)")
    problems = Problems("CheXpert", root)
    dup = frame["rel"].duplicated()
    problems.add(frame.loc[dup, "rel"], "image listed more than once")
    frame = frame.loc[~dup].reset_index(drop=True)
    if check_files:
        frame = check_missing(frame, list_files(root), problems)
    frame = check_studies_agree(frame, [raw_column(x) for x in CHEXPERT_LABELS], problems,
                                reason="study's views disagree on the labels")
    if data.views != "all":
        frame = frame.loc[frame["view"] == data.views].reset_index(drop=True)
    frame["image_path"] = [storage.join(root, rel) for rel in frame["rel"]]
    frame = frame.drop(columns="csv_row")
    return finish(frame, data, available=CHEXPERT_LABELS, name="chexpert", group="view",
                  groups=VIEWS, aggregation="max", problems=problems,
                  competition=COMPETITION_LABELS, has_official_test=has_valid)
