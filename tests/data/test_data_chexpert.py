"""The chexpert reader: a hand-made CheXpert tree (layouts, views, valid.csv as test, bad
inputs), and the real CheXpert train.csv shipped in torchxrayvision's wheel, whose per-study
counts must be the published ones."""

from __future__ import annotations

import glob
import io
import os
import sys

import numpy as np
import pandas as pd
import pytest

from raysearch.config import DataConfig
from raysearch.data.chexpert import CHEXPERT_LABELS, read_chexpert, read_chexpert_csv
from raysearch.data.formats import detect_format
from raysearch.data.labels import label_counts
from raysearch.errors import ConfigError, DataError

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
REL = "CheXpert-v1.0-small"


def row(path, view="Frontal", **labels):
    values = {name: "" for name in CHEXPERT_LABELS}
    values.update({k.replace("_", " "): v for k, v in labels.items()})
    return [path, "Female", "60", view, "AP" if view == "Frontal" else "", *values.values()]


def train_rows(prefix=f"{REL}/"):
    p = prefix + "train/"
    return [
        # patient 1: one study, frontal + lateral with the same labels
        row(p + "patient00001/study1/view1_frontal.jpg", Cardiomegaly="1.0", Edema="-1.0"),
        row(p + "patient00001/study1/view2_lateral.jpg", "Lateral", Cardiomegaly="1.0",
            Edema="-1.0"),
        row(p + "patient00002/study1/view1_frontal.jpg", No_Finding="1.0", Support_Devices="1.0"),
        row(p + "patient00003/study1/view1_frontal.jpg", Cardiomegaly="0.0", Edema="1.0"),
        row(p + "patient00003/study2/view1_frontal.jpg", Atelectasis="-1.0"),
        row(p + "patient00004/study1/view1_frontal.jpg", Pleural_Effusion="1.0"),
        row(p + "patient00005/study1/view1_frontal.jpg", No_Finding="1.0"),
        row(p + "patient00006/study1/view1_frontal.jpg", Consolidation="1.0"),
        row(p + "patient00007/study1/view1_frontal.jpg", Edema="0.0"),
        row(p + "patient00008/study1/view1_frontal.jpg", Cardiomegaly="1.0"),
        row(p + "patient00008/study1/view2_lateral.jpg", "Lateral", Cardiomegaly="1.0"),
    ]


def valid_rows(prefix=f"{REL}/"):
    labels = {name.replace(" ", "_"): "0.0" for name in CHEXPERT_LABELS}
    return [row(prefix + "valid/patient64541/study1/view1_frontal.jpg", **{**labels,
                                                                         "Edema": "1.0"}),
            row(prefix + "valid/patient64542/study1/view1_frontal.jpg", **labels)]


def make_tree(base, train=None, valid=None, *, release=True, prefix=f"{REL}/"):
    root = base / REL if release else base
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.csv", train if train is not None else train_rows(prefix)),
                       ("valid.csv", valid if valid is not None else valid_rows(prefix))):
        pd.DataFrame(rows, columns=HEADER).to_csv(root / name, index=False)
        for r in rows:
            rel = r[0].split("/", 1)[1] if r[0].startswith(REL) else r[0]
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"\xff\xd8stand-in\xff\xd9")
    return root


def read(root, **options):
    options.setdefault("val_fraction", 0.25)
    return read_chexpert(str(root), DataConfig(root=str(root), format="chexpert", **options))


def test_layout_task_and_official_test(tmp_path):
    make_tree(tmp_path)
    assert detect_format(str(tmp_path)) == "chexpert"
    m, task = read(tmp_path)  # the parent of the release folder
    assert task.name == "chexpert" and task.k == 14 and task.aggregation == "max"
    assert task.group == "view" and task.groups == ("frontal", "lateral")
    assert (m["split"] == "test").sum() == 2 and set(m.loc[m["split"] == "test", "patient_id"]) \
        == {"patient64541", "patient64542"}
    assert m.groupby("patient_id")["split"].nunique().max() == 1
    assert m.loc[m["view"] == "lateral", "study_id"].tolist() == [
        "train/patient00001/study1", "train/patient00008/study1"]
    assert m["image_path"].map(os.path.exists).all()
    p1 = m[m["patient_id"] == "patient00001"]
    assert p1["label_cardiomegaly"].tolist() == [1.0, 1.0]
    assert p1["label_edema"].isna().all()  # U-Ignore
    assert p1["label_atelectasis"].tolist() == [0.0, 0.0]  # blank -> 0
    m2, _ = read(tmp_path / REL)  # the release folder itself gives the same manifest
    assert m2["image_path"].tolist() == m["image_path"].tolist()


@pytest.mark.parametrize("release, prefix", [(True, ""), (False, f"{REL}/"), (False, "")])
def test_paths_with_or_without_the_release_folder(tmp_path, release, prefix):
    root = make_tree(tmp_path, release=release, prefix=prefix)
    m, _ = read(root)
    assert len(m) == 13 and m["image_path"].map(os.path.exists).all()


def test_views_labels_and_report_3_policy(tmp_path):
    make_tree(tmp_path)
    m, _ = read(tmp_path, views="lateral", val_fraction=0.5)
    assert len(m) == 2 and (m["view"] == "lateral").all()
    m, task = read(tmp_path, views="frontal", labels="competition")
    assert task.labels == ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                           "Pleural Effusion") and (m["view"] == "frontal").all()
    # Report 3: drop uncertain, blanks 0, drop all-negative, with No Finding and Sick
    m, task = read(tmp_path, labels=["No Finding", "Cardiomegaly", "Edema"], uncertain="drop",
                   drop_all_negative=True, any_finding=True, val_fraction=0.5)
    steps = m.attrs["steps"]
    # 13 images. Uncertain in a chosen label: patient 1's two views (Edema); patient 3's study 2
    # is uncertain in Atelectasis only, not chosen. All negative after that: patient 3 study 2,
    # patients 4 (Effusion only), 6 (Consolidation only) and 7, and valid's patient64542.
    assert steps == {"read": 13, "uncertain dropped": 2, "all negative dropped": 5, "kept": 6}
    assert task.labels == ("No Finding", "Cardiomegaly", "Edema", "Sick")
    sick = m.set_index("patient_id")["label_sick"].to_dict()
    assert sick == {"patient00002": 0.0, "patient00003": 1.0, "patient00005": 0.0,
                    "patient00008": 1.0, "patient64541": 1.0}


def test_unknown_label_and_options(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(ConfigError, match="unknown label 'Effusion' in chexpert; its labels: "
                                          "No Finding"):
        read(tmp_path, labels=["Effusion"])


@pytest.mark.parametrize("edit, message", [
    (lambda t: t[3].__setitem__(7, "2.0"), ("train.csv row 5: Cardiomegaly is '2.0'; CheXpert "
                                           "labels are 1.0, 0.0, -1.0 or blank")),
    (lambda t: t[1].__setitem__(7, "0.0"), (r"study's views disagree on the labels \(1\): "
                                           "train/patient00001/study1")),
    (lambda t: t[1].__setitem__(3, "Frontal"), ("train.csv row 3: Frontal/Lateral is 'Frontal' "
                                               "but the file is a lateral view")),
    (lambda t: t[0].__setitem__(0, "CheXpert-v1.0-small/train/p1/study1/view1_frontal.jpg"),
     ("train.csv row 2: 'CheXpert-v1.0-small/train/p1/study1/view1_frontal.jpg' is not a "
     "CheXpert image path")),
    (lambda t: t.append(row(f"{REL}/valid/patient00002/study9/view1_frontal.jpg")),
     "is not under train/"),
])
def test_bad_inputs_are_named(tmp_path, edit, message):
    rows = train_rows()
    edit(rows)
    make_tree(tmp_path, train=rows)
    with pytest.raises(DataError, match=message):
        read(tmp_path)


def test_missing_image_and_patient_in_train_and_valid(tmp_path):
    root = make_tree(tmp_path)
    os.remove(root / "train/patient00004/study1/view1_frontal.jpg")
    with pytest.raises(DataError, match=r"image listed but missing \(1\): "
                                        "train/patient00004/study1/view1_frontal.jpg"):
        read(tmp_path)
    m, _ = read(tmp_path, skip_bad=True)
    assert len(m) == 12 and m.attrs["skipped"]["reason"].tolist() == ["image listed but missing"]
    leaky = valid_rows()
    leaky[1][0] = f"{REL}/valid/patient00002/study5/view1_frontal.jpg"
    make_tree(tmp_path / "leak", valid=leaky)
    with pytest.raises(DataError, match=r"1 patient\(s\) appear in more than one split .*"
                                        "patient00002"):
        read(tmp_path / "leak")


# ---------------------------------------------------------------------------------------------
# The real train.csv (labels only) from torchxrayvision's wheel


def _shipped_csv():
    hits = [p for d in sys.path for p in
            glob.glob(os.path.join(d, "torchxrayvision", "data", "chexpert_train.csv*"))]
    # torchxrayvision is in the [test] extra: a missing file is a broken install, not a skip
    assert hits, "torchxrayvision's chexpert_train.csv.gz is not installed: pip install -e '.[test]'"
    with open(hits[0], "rb") as f:
        return f.read()


# The CheXpert paper (Irvin et al. 2019, arXiv:1901.07031), Table 1: studies of the training
# set per observation, positive / uncertain / negative (negative: 0 or not mentioned).
PAPER_TABLE_1 = {
    "No Finding": (16627, 0, 171014),
    "Enlarged Cardiomediastinum": (9020, 10148, 168473),
    "Cardiomegaly": (23002, 6597, 158042),
    "Lung Opacity": (92669, 4341, 90631),
    "Lung Lesion": (6856, 1071, 179714),
    "Edema": (48905, 11571, 127165),
    "Consolidation": (12730, 23976, 150935),
    "Pneumonia": (4576, 15658, 167407),
    "Atelectasis": (29333, 29377, 128931),
    "Pneumothorax": (17313, 2663, 167665),
    "Pleural Effusion": (75696, 9419, 102526),
    "Pleural Other": (2441, 1771, 183429),
    "Fracture": (7270, 484, 179887),
    "Support Devices": (105831, 898, 80912),
}


def test_real_train_csv_reproduces_the_published_counts(tmp_path):
    frame = read_chexpert_csv(_shipped_csv(), name="chexpert_train.csv.gz")
    assert len(frame) == 223_414 and frame["patient_id"].nunique() == 64_540
    assert frame["study_id"].nunique() == 187_641
    assert frame["view"].value_counts().to_dict() == {"frontal": 191_027, "lateral": 32_387}
    counts = label_counts(frame, CHEXPERT_LABELS, by="study").set_index("label")
    got = {name: (int(r.positive), int(r.uncertain), int(r.negative + r.blank))
           for name, r in counts.iterrows()}
    assert got == PAPER_TABLE_1


def test_real_train_csv_reads_with_stand_in_images(tmp_path):
    """The whole reader on the first 3,000 real rows, with stand-in image files."""
    text = io.BytesIO(_shipped_csv())
    table = pd.read_csv(text, compression="gzip", dtype=str, keep_default_na=False, nrows=3000)
    root = tmp_path / REL
    root.mkdir()
    table.to_csv(root / "train.csv", index=False)
    for path in table["Path"]:
        f = tmp_path / path
        f.parent.mkdir(parents=True, exist_ok=True)
        f.touch()
    m, task = read(tmp_path, uncertain="drop", blank="zeros", drop_all_negative=True,
                   test_fraction=0.2, val_fraction=0.2)
    assert m.attrs["steps"]["read"] == 3000 and m["split"].value_counts().size == 3
    assert m.groupby("patient_id")["split"].nunique().max() == 1
    assert not any(m[c].isna().any() for c in task.label_columns)
    assert not (m[list(task.label_columns)].to_numpy(np.float64) == 0).all(axis=1).any()


def test_mura_weighting_counts_a_study_in_each_view_it_has(tmp_path):
    """class_weighting mura weighs per group; CheXpert's group (view) varies within a study, so
    a study with a lateral view must count in the lateral group too (it gave NaN weights)."""
    from raysearch.train.losses import label_weights

    make_tree(tmp_path)
    m, task = read(tmp_path, labels=["Cardiomegaly", "Edema"])
    w = label_weights(m, task=task, scheme="mura")  # every image, as if all were training
    known = ~m[list(task.label_columns)].isna().to_numpy()
    assert np.isfinite(w).all() and (w[known] > 0).all()


def test_raysearch_data_prints_the_policy_table(tmp_path, capsys):
    from raysearch.cli import main

    make_tree(tmp_path)
    assert main(["data", str(tmp_path), "--uncertain", "drop", "--drop-all-negative",
                 "--labels", "No Finding,Cardiomegaly,Edema", "--val-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "chexpert manifest" in out and "→ masked" in out
    assert "images: read 13, uncertain dropped 2, all negative dropped 5, kept 6" in out
    edema = next(line for line in out.splitlines() if line.startswith("│ Edema"))
    # before: 2 positive (patient 3, valid's 64541), 2 negative (patient 7, valid's 64542),
    # 2 uncertain (patient 1's views), 7 blank; after, of the 6 images kept: 2 positive, 4 negative
    assert [int(c) for c in edema.split("│")[2:-1]] == [2, 2, 2, 7, 2, 4, 0]
    assert main(["data", str(tmp_path), "--format", "nih"]) == 2
    assert "no ChestX-ray14 dataset" in capsys.readouterr().err
