"""The csv reader: a hand-made manifest with known counts, every label policy, and each bad input
named in one line."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest

from raysearch.config import DataConfig
from raysearch.data.formats import detect_format
from raysearch.data.manifest_csv import read_csv_manifest
from raysearch.data.prepare import read_dataset
from raysearch.errors import ConfigError, DataError

# 8 patients, one image each except p1 (a study of two views) and p2 (two studies).
ROWS = [
    # path,       patient, study, group,  A,    B
    ("img/a.png", "p1", "s1", "front", "1", ""),
    ("img/b.png", "p1", "s1", "side", "1", ""),
    ("img/c.png", "p2", "s2", "front", "-1", "0"),
    ("img/d.png", "p2", "s3", "front", "0", "0"),
    ("img/e.png", "p3", "s4", "front", "0", "1"),
    ("img/f.png", "p4", "s5", "front", "", "-1"),
    ("img/g.png", "p5", "s6", "front", "1.0", "0.0"),
    ("img/h.png", "p6", "s7", "front", "0", ""),
    ("img/i.png", "p7", "s8", "front", "-1", "-1"),
    ("img/j.png", "p8", "s9", "front", "0", "1"),
]


# p3 and p8 (images e and j) keep a label under every policy: they make a fixed val split.
SPLIT_ROWS = [(*r, "val" if r[1] in ("p3", "p8") else "train") for r in ROWS]
SPLIT_HEADER = ("path", "patient_id", "study_id", "group", "A", "B", "split")


def write(tmp_path, rows=ROWS, *, header=("path", "patient_id", "study_id", "group", "A", "B"),
          files=True, name="manifest.csv"):
    (tmp_path / "img").mkdir(exist_ok=True)
    if files:
        for r in rows:
            (tmp_path / r[0]).write_bytes(b"x")
    table = pd.DataFrame(rows, columns=list(header))
    path = tmp_path / name
    if name.endswith(".parquet"):
        table.to_parquet(path)
    else:
        table.to_csv(path, index=False)
    return str(path)


def read(path, **options):
    options.setdefault("val_fraction", 0.25)
    return read_csv_manifest(path, DataConfig(root=path, **options), check_files=True)


def counts(m, name):
    y = m[f"label_{name.lower()}"].to_numpy(np.float64)
    return int((y == 1).sum()), int((y == 0).sum()), int(np.isnan(y).sum())


# Raw: A = 1,1,-1,0,0,blank,1,0,-1,0  B = blank,blank,0,0,1,-1,0,blank,-1,1
@pytest.mark.parametrize("options, a, b, kept", [
    ({}, (3, 5, 2), (2, 6, 2), 10),                                    # U-Ignore, blank 0
    ({"uncertain": "zeros"}, (3, 7, 0), (2, 8, 0), 10),
    ({"uncertain": "ones"}, (5, 5, 0), (4, 6, 0), 10),
    ({"blank": "ignore"}, (3, 4, 3), (2, 3, 5), 10),
    ({"uncertain": "drop"}, (3, 4, 0), (2, 5, 0), 7),                  # c, f, i go
    ({"uncertain": "drop", "drop_all_negative": True}, (3, 2, 0), (2, 3, 0), 5),  # d, h go too
    ({"uncertain": "zeros", "drop_all_negative": True}, (3, 2, 0), (2, 3, 0), 5),  # c,d,f,h,i
])
def test_every_policy_gives_the_known_counts(tmp_path, options, a, b, kept):
    m, task = read(write(tmp_path, SPLIT_ROWS, header=SPLIT_HEADER), **options)
    assert task.labels == ("A", "B") and task.group == "group" and task.aggregation == "mean"
    assert len(m) == kept and m.attrs["steps"]["kept"] == kept
    assert counts(m, "A") == a and counts(m, "B") == b
    # the raw codes stay beside the targets, for the table and for trial.uncertain
    assert set(m["raw_a"].dropna()) <= {1.0, 0.0, -1.0}


def test_any_finding_and_a_single_label(tmp_path):
    path = write(tmp_path, SPLIT_ROWS, header=SPLIT_HEADER)
    m, task = read(path, any_finding=True)
    assert task.labels == ("A", "B", "Sick")
    # Sick: 1 where A or B is 1 (a,b,e,g,j); 0 where both are 0 after blank->0 (d,h); else masked
    assert counts(m, "Sick") == (5, 2, 3)
    m, task = read(path, labels=["A", "Sick"])  # listing Sick asks for it; in a CSV it looks
    assert task.labels == ("A", "Sick") and counts(m, "Sick") == (3, 5, 2)  # at the chosen labels
    m, task = read(path, labels=["B"], uncertain="ones")
    assert task.labels == ("B",) and task.label_columns == ("label",)
    assert m["label"].dtype == np.int64 and int(m["label"].sum()) == 4
    m, _ = read(path, labels=["B"])  # U-Ignore with one label: the masked rows cannot train
    assert len(m) == 8 and m.attrs["steps"]["single label masked, dropped"] == 2


def test_split_is_patient_level_seeded_and_complete(tmp_path):
    path = write(tmp_path)
    m, _ = read(path, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert m.groupby("patient_id")["split"].nunique().max() == 1
    assert m.drop_duplicates("patient_id")["split"].value_counts().to_dict() == {
        "train": 4, "val": 2, "test": 2}
    m2, _ = read(path, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert m["split"].tolist() == m2["split"].tolist()
    m3, _ = read(path, val_fraction=0.25, test_fraction=0.25, seed=4)
    assert m3.sort_values("image_path")["split"].tolist() != m.sort_values("image_path")["split"].tolist()
    assert m["image_path"].str.startswith(str(tmp_path)).all()


def test_parquet_study_default_and_column_options(tmp_path):
    rows = [(r[0], r[1], r[4], r[5]) for r in ROWS]
    path = write(tmp_path, rows, header=("file", "who", "A", "B"), name="m.parquet")
    assert detect_format(path) == "csv"
    with pytest.raises(DataError, match="no path column"):
        read(path)
    m, task = read(path, path_column="file", patient_column="who")
    assert m["study_id"].nunique() == 10  # one study per image by default
    assert task.group == "group" and set(m["group"]) == {"all"}
    with pytest.raises(ConfigError, match="data.study_column: no column 'nope'"):
        read(path, path_column="file", patient_column="who", study_column="nope")


def test_read_dataset_detects_csv(tmp_path):
    path = write(tmp_path)
    m, task = read_dataset(DataConfig(root=path))
    assert task.name == "csv" and len(m) == 10
    with pytest.raises(ConfigError, match="data.views does not apply to the csv format"):
        read_dataset(DataConfig(root=path, views="frontal"))
    with pytest.raises(ConfigError, match="data.views does not apply to the mura format"):
        from raysearch.data.prepare import _check_mura_options

        _check_mura_options(DataConfig(views="frontal"))


def test_split_column_and_patient_in_two_splits(tmp_path):
    split = ["train", "train", "train", "train", "val", "val", "test", "train", "train", "test"]
    rows = [(*r, s) for r, s in zip(ROWS, split)]
    header = ("path", "patient_id", "study_id", "group", "A", "B", "split")
    m, _ = read(write(tmp_path, rows, header=header))
    assert m.set_index("image_path")["split"].to_dict()[str(tmp_path / "img/e.png")] == "val"
    assert (m["split"] == "test").sum() == 2
    rows[3] = (*ROWS[3], "test")  # p2's second study in test, its first in train
    with pytest.raises(DataError, match=r"1 patient\(s\) appear in more than one split.*p2"):
        read(write(tmp_path, rows, header=header))
    rows[3] = (*ROWS[3], "holdout")
    with pytest.raises(DataError, match="row 5 is 'holdout'; allowed: train, val, test"):
        read(write(tmp_path, rows, header=header))


@pytest.mark.parametrize("change, message", [
    (lambda r: r.__setitem__(4, ("img/e.png", "p3", "s4", "front", "yes", "1")),
     "label column 'A' row 6 has value 'yes'; a label is 1, 0, -1 or empty"),
    (lambda r: r.__setitem__(4, ("img/e.png", "p3", "s4", "front", "2", "1")),
     "label column 'A' row 6 has value '2'"),
    (lambda r: r.append(r[0]), "image listed more than once (1): img/a.png"),
    (lambda r: r.__setitem__(1, ("img/b.png", "p1", "s1", "side", "0", "")),
     "study's images disagree on the labels (1): s1"),
    (lambda r: r.__setitem__(1, ("img/b.png", "p9", "s1", "side", "1", "")),
     "study's images name different patients (1): s1"),
])
def test_bad_inputs_are_named(tmp_path, change, message):
    rows = list(ROWS)
    change(rows)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read(write(tmp_path, rows))


def test_missing_image_is_named_and_skip_bad_leaves_it_out(tmp_path):
    path = write(tmp_path)
    (tmp_path / "img/c.png").unlink()
    with pytest.raises(DataError, match=r"image listed but missing \(1\): img/c.png"):
        read(path)
    m, _ = read(path, skip_bad=True)
    assert len(m) == 9 and m.attrs["skipped"]["path"].tolist() == ["img/c.png"]


def test_unknown_label_is_named(tmp_path):
    with pytest.raises(ConfigError, match="data.labels: no label column 'C'"):
        read(write(tmp_path), labels=["A", "C"])
    with pytest.raises(ConfigError, match=r"data.labels: unknown value 'A'; allowed: all, "
                                          r"competition, or a list of label names \(\[A\] for"):
        DataConfig(labels="A")
    assert not math.isnan(DataConfig(test_fraction=0.2).test_fraction)


def test_retarget_changes_only_the_uncertain_cells(tmp_path):
    """trial.uncertain: a trial's training targets under another policy, from the raw codes."""
    from raysearch.data.labels import retarget

    m, task = read(write(tmp_path, SPLIT_ROWS, header=SPLIT_HEADER))  # U-Ignore, blanks 0
    assert retarget(m, task, uncertain=None) is m
    ones = retarget(m, task, uncertain="ones")
    assert counts(ones, "A") == (5, 5, 0) and counts(ones, "B") == (4, 6, 0)
    zeros = retarget(m, task, uncertain="zeros")
    assert counts(zeros, "A") == (3, 7, 0)
    assert len(retarget(m, task, uncertain="drop")) == 7
    assert counts(retarget(m, task, uncertain="ignore"), "A") == counts(m, "A")
    # blanks keep the data's policy: with blank ignore they stay masked under `ones`
    mb, tb = read(write(tmp_path, SPLIT_ROWS, header=SPLIT_HEADER), blank="ignore")
    assert counts(retarget(mb, tb, uncertain="ones"), "B") == (4, 3, 3)
    # one label: `ignore` cannot mask an int label, so those rows go
    m1, t1 = read(write(tmp_path, SPLIT_ROWS, header=SPLIT_HEADER), labels=["A"],
                  uncertain="zeros")
    assert len(retarget(m1, t1, uncertain="ignore")) == 8
    assert retarget(m1, t1, uncertain="ones")["label"].tolist().count(1) == 5
    with pytest.raises(DataError, match="trial.uncertain needs the raw label codes"):
        retarget(m.drop(columns=["raw_a"]), task, uncertain="ones")


def test_labels_that_would_share_a_column_are_refused(tmp_path):
    rows = [(*r[:5], r[4]) for r in ROWS]
    with pytest.raises(ConfigError, match="'A b' and 'a_b' would share the column label_a_b"):
        read(write(tmp_path, rows, header=("path", "patient_id", "study_id", "group", "A b",
                                           "a_b")))


def test_paths_outside_the_manifest_folder_and_absolute(tmp_path):
    rows = list(ROWS)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "k.png").write_bytes(b"x")
    rows[0] = ("../elsewhere/k.png", *ROWS[0][1:])
    rows[1] = (str(tmp_path / "sub" / "img" / "b.png"), *ROWS[1][1:])
    rows[2] = ("./img/c.png", *ROWS[2][1:])
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub", rows)
    m, _ = read(path)
    assert set(m["image_path"]) >= {str(tmp_path / "elsewhere" / "k.png"),
                                    str(tmp_path / "sub" / "img" / "b.png"),
                                    str(tmp_path / "sub" / "img" / "c.png")}
    os.remove(tmp_path / "elsewhere" / "k.png")
    with pytest.raises(DataError, match=r"image listed but missing \(1\): ../elsewhere/k.png"):
        read(path)
