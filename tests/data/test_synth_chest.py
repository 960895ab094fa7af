"""The synthetic chest demo data: exact CheXpert and ChestX-ray14 layouts that their readers take,
uncertain and blank values in train, 0/1 in valid, both views, NIH names, the same bytes for the
same seed, and findings drawn where the labels say."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raysearch.config import DataConfig
from raysearch.data.chexpert import CHEXPERT_LABELS
from raysearch.data.prepare import read_dataset
from raysearch.data.synth_chest import make_chexpert_demo, make_nih_demo
from raysearch.errors import DataError


@pytest.fixture(scope="module")
def chexpert_demo(tmp_path_factory):
    return make_chexpert_demo(str(tmp_path_factory.mktemp("cx")), size="tiny", num_workers=1)


def test_chexpert_demo_layout_and_values(chexpert_demo):
    train = pd.read_csv(os.path.join(chexpert_demo, "train.csv"), dtype=str,
                        keep_default_na=False)
    valid = pd.read_csv(os.path.join(chexpert_demo, "valid.csv"), dtype=str,
                        keep_default_na=False)
    assert list(train.columns) == ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA",
                                   *CHEXPERT_LABELS]
    assert train["Path"].str.match(r"CheXpert-v1\.0-small/train/patient\d{5}/study\d+/"
                                   r"view\d_(frontal|lateral)\.jpg$").all()
    cells = train[list(CHEXPERT_LABELS)].to_numpy().ravel()
    assert set(cells) == {"1.0", "0.0", "-1.0", ""}
    assert set(train["No Finding"]) == {"1.0", ""}
    assert set(valid[list(CHEXPERT_LABELS)].to_numpy().ravel()) == {"0.0", "1.0"}
    assert set(train["Frontal/Lateral"]) == {"Frontal", "Lateral"}
    with open(os.path.join(os.path.dirname(chexpert_demo), train["Path"].iat[0]), "rb") as f:
        assert f.read(2) == b"\xff\xd8"  # JPEG
    m, task = read_dataset(DataConfig(root=os.path.dirname(chexpert_demo), val_fraction=0.2))
    assert task.name == "chexpert" and task.aggregation == "max" and task.group == "view"
    assert set(m["split"]) == {"train", "val", "test"} and set(m["view"]) == {"frontal",
                                                                             "lateral"}


def test_chexpert_demo_findings_are_drawn_and_correlated(chexpert_demo):
    valid = pd.read_csv(os.path.join(chexpert_demo, "valid.csv"))
    train = pd.read_csv(os.path.join(chexpert_demo, "train.csv"))
    truth = pd.concat([valid, train]) == 1
    # congestion: Cardiomegaly and Edema go together more often than by chance
    assert truth["Cardiomegaly"].astype(float).corr(truth["Edema"].astype(float)) > 0.2
    base = os.path.dirname(chexpert_demo)
    frontal = valid[valid["Frontal/Lateral"] == "Frontal"]
    # Support Devices are drawn near white: the brightest pixel tells them apart
    bright = [np.asarray(Image.open(os.path.join(base, p)).convert("L")).max() >= 235
              for p in frontal["Path"]]
    assert np.array_equal(np.array(bright), frontal["Support Devices"].to_numpy() == 1)


def test_same_seed_same_bytes_and_overwrite(tmp_path, chexpert_demo):
    again = make_chexpert_demo(str(tmp_path), size="tiny", num_workers=1)
    rel = "train/patient00001/study1/view1_frontal.jpg"
    with open(os.path.join(again, rel), "rb") as a, open(os.path.join(chexpert_demo, rel), "rb") as b:
        assert a.read() == b.read()
    with pytest.raises(DataError, match="already exists"):
        make_chexpert_demo(str(tmp_path), size="tiny", num_workers=1)
    os.remove(os.path.join(again, ".raysearch-demo.json"))
    with pytest.raises(DataError, match="was not made by raysearch demo-data"):
        make_chexpert_demo(str(tmp_path), size="tiny", num_workers=1, overwrite=True)


def test_nih_demo_layout_and_names(tmp_path):
    root = make_nih_demo(str(tmp_path), size="tiny", num_workers=1)
    with open(os.path.join(root, "Data_Entry_2017_v2020.csv")) as f:
        assert f.readline().rstrip("\n").endswith(
            "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
    assert {"test_list.txt", "train_val_list.txt", "images_001"} <= set(os.listdir(root))
    m, task = read_dataset(DataConfig(root=root, val_fraction=0.2))
    assert task.name == "nih" and "Effusion" in task.labels and (m["split"] == "test").any()
    entries = pd.read_csv(os.path.join(root, "Data_Entry_2017_v2020.csv"), usecols=[0, 1])
    names = {x for s in entries["Finding Labels"] for x in s.split("|")}
    assert "Effusion" in names and "No Finding" in names and "Pleural Effusion" not in names
    # The folder demo-data was given (the ChestX-ray14 folder's parent) reads the same, as a
    # MURA or CheXpert parent does: `ensemble --test-data DIR --format nih` takes it.
    parent = os.path.dirname(root)
    assert os.path.basename(root) == "ChestX-ray14"
    from raysearch.data.formats import detect_format

    assert detect_format(parent) == "nih"
    again, _ = read_dataset(DataConfig(root=parent, format="nih", val_fraction=0.2))
    assert again["image_path"].tolist() == m["image_path"].tolist()
