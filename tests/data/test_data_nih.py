"""The nih reader: a hand-made ChestX-ray14 folder in both CSV dialects and both image layouts,
its bad inputs, and the real Data_Entry_2017_v2020.csv shipped in torchxrayvision's wheel."""

from __future__ import annotations

import glob
import os
import sys

import pytest

from raysearch.config import DataConfig
from raysearch.data.formats import detect_format
from raysearch.data.labels import label_counts
from raysearch.data.nih import NIH_LABELS, read_nih, read_nih_csv
from raysearch.errors import ConfigError, DataError

HEADER_2020 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
               "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
ENTRIES = [
    ("00000001_000.png", "Cardiomegaly", 1, "PA"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1, "PA"),
    ("00000002_000.png", "No Finding", 2, "AP"),
    ("00000003_000.png", "Effusion|Edema", 3, "AP"),
    ("00000004_000.png", "No Finding", 4, "PA"),
    ("00000005_000.png", "Atelectasis", 5, "PA"),
    ("00000006_000.png", "Hernia", 6, "PA"),
    ("00000007_000.png", "No Finding", 7, "AP"),
]


def make_nih(base, entries=ENTRIES, *, style="2020", layout="flat", test=("00000006_000.png",
                                                                          "00000007_000.png")):
    base.mkdir(parents=True, exist_ok=True)
    lines = [HEADER_2020 + ("," if style == "2017" else "")]
    for i, (image, findings, patient, view) in enumerate(entries):
        line = f"{image},{findings},0,{patient},50,M,{view},2500,2048,0.143,0.143"
        lines.append(line + ("," if style == "2017" else ""))
    name = "Data_Entry_2017.csv" if style == "2017" else "Data_Entry_2017_v2020.csv"
    (base / name).write_text("\n".join(lines) + "\n")
    for i, (image, *_rest) in enumerate(entries):
        folder = base / "images" if layout == "flat" else base / f"images_{1 + i % 2:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / image).write_bytes(b"\x89PNG stand-in")
    if test is not None:
        (base / "test_list.txt").write_text("\n".join(test) + "\n")
        (base / "train_val_list.txt").write_text(
            "\n".join(e[0] for e in entries if e[0] not in test) + "\n")
    return base


def read(root, **options):
    options.setdefault("val_fraction", 0.25)
    return read_nih(str(root), DataConfig(root=str(root), format="nih", **options))


@pytest.mark.parametrize("style, layout", [("2020", "flat"), ("2017", "split")])
def test_both_dialects_and_layouts(tmp_path, style, layout):
    root = make_nih(tmp_path / "nih", style=style, layout=layout)
    assert detect_format(str(root)) == "nih"
    m, task = read(root)
    assert task.name == "nih" and task.labels == NIH_LABELS and task.aggregation == "max"
    assert task.group == "view" and set(m["view"]) == {"PA", "AP"}
    assert m["image_path"].map(os.path.exists).all()
    assert set(m.loc[m["split"] == "test", "patient_id"]) == {"6", "7"}
    assert m.groupby("patient_id")["split"].nunique().max() == 1
    by_image = m.set_index(m["image_path"].map(os.path.basename))
    assert by_image.loc["00000001_001.png", ["label_cardiomegaly", "label_emphysema",
                                             "label_effusion"]].tolist() == [1.0, 1.0, 0.0]
    assert by_image.loc["00000002_000.png", [f"label_{c.lower()}" for c in
                                             ("Atelectasis", "Hernia")]].tolist() == [0.0, 0.0]
    assert m["study_id"].is_unique  # each image is its own study


def test_the_split_lines_and_the_trailing_column_are_named(tmp_path):
    root = make_nih(tmp_path / "nih", style="2017")
    frame = read_nih_csv(str(root / "Data_Entry_2017.csv"))
    assert list(frame.columns[:4]) == ["image_index", "patient_id", "follow_up", "view"]
    assert len(frame) == len(ENTRIES)


def test_competition_labels_any_finding_and_no_lists(tmp_path):
    root = make_nih(tmp_path / "nih", test=None)
    m, task = read(root, labels="competition", any_finding=True, val_fraction=0.25,
                   test_fraction=0.25)
    assert task.labels == ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion",
                           "Sick")
    assert m.attrs["split_note"].startswith("patients split train/val/test")
    sick = m.set_index(m["image_path"].map(os.path.basename))["label_sick"]
    assert sick["00000006_000.png"] == 1.0 and sick["00000004_000.png"] == 0.0


def test_bad_inputs_are_named(tmp_path):
    bad = list(ENTRIES)
    bad[2] = ("00000002_000.png", "Cardiomegally", 2, "AP")
    with pytest.raises(DataError, match=r"row 4 \(00000002_000.png\): unknown finding "
                                        "'Cardiomegally'"):
        read(make_nih(tmp_path / "a", bad))
    root = make_nih(tmp_path / "b", test=("00000001_000.png",))  # patient 1 also in train
    with pytest.raises(DataError, match=r"1 patient\(s\) appear in more than one split.*: 1"):
        read(root)
    root = make_nih(tmp_path / "c")
    os.remove(root / "images" / "00000005_000.png")
    with pytest.raises(DataError, match=r"image listed but missing \(1\): "
                                        "images/00000005_000.png"):
        read(root)
    with pytest.raises(ConfigError, match="frontal views only"):
        read(root, views="lateral")
    with pytest.raises(ConfigError, match="unknown label 'Pleural Effusion' in nih"):
        read(root, labels=["Pleural Effusion"])


# The published counts of ChestX-ray14 (NIH Clinical Center release notes; Kaggle's dataset
# page): images per finding, 60,361 without one; 112,120 images of 30,805 patients.
PUBLISHED = {
    "Atelectasis": 11559, "Cardiomegaly": 2776, "Effusion": 13317, "Infiltration": 19894,
    "Mass": 5782, "Nodule": 6331, "Pneumonia": 1431, "Pneumothorax": 5302,
    "Consolidation": 4667, "Edema": 2303, "Emphysema": 2516, "Fibrosis": 1686,
    "Pleural_Thickening": 3385, "Hernia": 227,
}


def test_real_data_entry_csv():
    hits = [p for d in sys.path for p in glob.glob(
        os.path.join(d, "torchxrayvision", "data", "Data_Entry_2017_v2020.csv*"))]
    # torchxrayvision is in the [test] extra: a missing file is a broken install, not a skip
    assert hits, "torchxrayvision's Data_Entry_2017_v2020.csv.gz is not installed: pip install -e '.[test]'"
    frame = read_nih_csv(hits[0])
    assert len(frame) == 112_120 and frame["patient_id"].nunique() == 30_805
    counts = label_counts(frame, NIH_LABELS).set_index("label")["positive"].to_dict()
    assert counts == PUBLISHED
    raw = frame[[c for c in frame.columns if c.startswith("raw_")]]
    assert int((raw.sum(axis=1) == 0).sum()) == 60_361
