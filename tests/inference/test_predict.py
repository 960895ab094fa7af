"""`raysearch predict` (raysearch.inference.predict) on PNG study folders, real DICOM radiographs
in three encodings, a CSV, and a bucket (the GCS emulator); bad inputs are skipped by name or
refused with one line."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from raysearch.data.mura import MURA_TASK, read_mura
from raysearch.errors import DataError
from raysearch.inference.predict import collect_images, run_predict
from raysearch.inference.predictor import Predictor
from tests.gcs_emulator import gcs_emulator  # noqa: F401  (session fixture)
from tests.inference.test_predictor import two_member_ensemble


@pytest.fixture
def ensemble(tmp_path):
    """An ensemble folder of two members (two architectures, two image sizes)."""
    exp = tmp_path / "exp"
    two_member_ensemble(exp, column="checkpoint")  # an earlier release's column name
    return str(exp / "ensemble")


def _console():
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), width=200, color_system=None)


def test_a_folder_of_png_studies_at_any_depth(tmp_path, tiny_root, ensemble):
    valid = os.path.join(tiny_root, "MURA-v1.1", "valid")
    console = _console()
    out = run_predict([valid], ensemble=ensemble, out=str(tmp_path / "out"), console=console)
    images = pd.read_parquet(os.path.join(out, "predictions.parquet"))
    studies = pd.read_parquet(os.path.join(out, "studies.parquet"))
    manifest = read_mura(tiny_root)
    test = manifest[manifest["split"] == "test"]
    assert len(images) == len(test) and len(studies) == test["study_id"].nunique()
    # A study is the folder holding the images; the patient comes from the path.
    assert studies["study_id"].str.match(r"XR_[A-Z]+/patient\d+/study\d+_(positive|negative)$").all()
    assert (studies["patient_id"] == studies["study_id"].str.split("/").str[1]).all()
    # The same numbers as the predictor on the manifest's own study table.
    _, expected = Predictor.from_dir(ensemble).predict_studies(test)
    expected["key"] = expected["study_id"].str.removeprefix("valid/")
    got = studies.assign(key=studies["study_id"].str.replace(r"_(positive|negative)$", "",
                                                             regex=True))
    merged = got.merge(expected, on="key", suffixes=("", "_expected"))
    assert len(merged) == len(studies)
    np.testing.assert_allclose(merged["prob"], merged["prob_expected"], atol=1e-6)
    work = pd.read_csv(os.path.join(out, "worklist.csv"))
    assert list(work["rank"]) == list(range(1, len(studies) + 1))
    assert work["prob"].is_monotonic_decreasing
    assert pd.read_csv(os.path.join(out, "skipped.csv")).empty
    assert f"{len(studies)} studies ({len(images)} images)" in console.file.getvalue()


def test_studies_are_flagged_at_the_ensembles_threshold(tmp_path, tiny_root, ensemble):
    valid = os.path.join(tiny_root, "MURA-v1.1", "valid")
    first = run_predict([valid], ensemble=ensemble, out=str(tmp_path / "a"), console=_console())
    probs = pd.read_parquet(os.path.join(first, "studies.parquet"))["prob"]
    t = float(probs.median())  # a threshold that splits these studies in two
    with open(os.path.join(ensemble, "ensemble.json"), "w") as f:
        json.dump({"task": MURA_TASK.to_dict(), "threshold": t}, f)
    console = _console()
    out = run_predict([valid], ensemble=ensemble, out=str(tmp_path / "b"), console=console)
    studies = pd.read_parquet(os.path.join(out, "studies.parquet"))
    assert (studies["pred"] == (studies["prob"] > t)).all()
    assert 0 < studies["pred"].sum() < len(studies)
    assert f"at threshold {t:.3g}" in console.file.getvalue()


def test_dicom_radiographs_in_three_encodings(tmp_path, ensemble):
    folder = tmp_path / "pacs" / "study1"
    folder.mkdir(parents=True)
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm"):
        shutil.copy(get_testdata_file(name), folder / name)
    shutil.copy(get_testdata_file("RG3_UNCR.dcm"), folder / "RG3")  # no extension: the magic
    ct = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ct.Modality = "CT"  # not a radiograph: skipped with its reason, not scored
    ct.save_as(folder / "ct.dcm", enforce_file_format=True)
    console = _console()
    out = run_predict([str(tmp_path / "pacs")], ensemble=ensemble, out=str(tmp_path / "out"),
                      console=console)
    skipped = pd.read_csv(os.path.join(out, "skipped.csv")).set_index("path")["reason"]
    assert "modality CT is not a radiograph" in skipped[str(folder / "ct.dcm")]
    images = pd.read_parquet(os.path.join(out, "predictions.parquet")).set_index("image_path")
    p = images["prob"]
    assert p[str(folder / "RG1_UNCR.dcm")] == p[str(folder / "RG1_J2KR.dcm")]  # lossless: equal
    assert abs(p[str(folder / "RG1_UNCR.dcm")] - p[str(folder / "RG1_J2KI.dcm")]) < 0.05
    assert images.loc[str(folder / "RG3"), "body_part_hint"] == "EXTREMITY"
    assert images.loc[str(folder / "RG1_J2KR.dcm"), "view_hint"] == "PA"
    # RG1 and RG3 are two patients' studies (their Study Instance UIDs differ): put in one
    # folder, they are still scored as two studies, never averaged into one answer.
    studies = pd.read_parquet(os.path.join(out, "studies.parquet")).set_index("study_id")
    rg1, rg3 = (pydicom.dcmread(get_testdata_file(n), stop_before_pixels=True).StudyInstanceUID
                for n in ("RG1_UNCR.dcm", "RG3_UNCR.dcm"))
    assert dict(studies["n_images"]) == {f"study1/{rg1}": 3, f"study1/{rg3}": 1}
    assert studies.loc[f"study1/{rg3}", "prob"] == pytest.approx(p[str(folder / "RG3")])
    assert "held images of more than one DICOM study" in console.file.getvalue()


def test_a_csv_of_relative_paths(tmp_path, tiny_root, ensemble):
    manifest = read_mura(tiny_root)
    rows = manifest[manifest["split"] == "test"].head(6)
    (tmp_path / "imgs").mkdir()
    for i, path in enumerate(rows["image_path"]):
        shutil.copy(path, tmp_path / "imgs" / f"{i}.png")
    listing = tmp_path / "list.csv"
    pd.DataFrame({"image_path": [f"imgs/{i}.png" for i in range(6)],
                  "study_id": ["s1", "s1", "s2", "s2", "s3", "s3"]}).to_csv(listing, index=False)
    out = run_predict([str(listing)], ensemble=ensemble, out=str(tmp_path / "out"),
                      console=_console())
    studies = pd.read_parquet(os.path.join(out, "studies.parquet"))
    assert list(studies["study_id"]) == ["s1", "s2", "s3"] and (studies["n_images"] == 2).all()


def test_images_in_a_bucket(tmp_path, tiny_root, ensemble, gcs_emulator):  # noqa: F811
    manifest = read_mura(tiny_root)
    rows = manifest[manifest["split"] == "test"].head(4)
    base = gcs_emulator.url("incoming", "studyA")
    fs = gcs_emulator.fs
    for i, path in enumerate(rows["image_path"]):
        with open(path, "rb") as f:
            fs.pipe_file(f"{base.removeprefix('gs://')}/{i}.png", f.read())
    out = run_predict([gcs_emulator.url("incoming")], ensemble=ensemble,
                      out=str(tmp_path / "out"), console=_console())
    images = pd.read_parquet(os.path.join(out, "predictions.parquet"))
    assert images["image_path"].str.startswith(base).all() and len(images) == 4


def test_bad_inputs_are_skipped_by_name_or_refused(tmp_path, tiny_root, ensemble, capsys):
    from raysearch.cli import main

    study = tmp_path / "in" / "s1"
    study.mkdir(parents=True)
    good = read_mura(tiny_root)["image_path"].iloc[0]
    shutil.copy(good, study / "good.png")
    (study / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    no_pixels = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"))
    del no_pixels.PixelData
    no_pixels.save_as(study / "empty.dcm", enforce_file_format=True)
    console = _console()
    out = run_predict([str(tmp_path / "in")], ensemble=ensemble, out=str(tmp_path / "out"),
                      console=console)
    skipped = pd.read_csv(os.path.join(out, "skipped.csv")).set_index("path")["reason"]
    assert f"cannot decode image {study / 'broken.png'}" in skipped[str(study / "broken.png")]
    assert "<bytes>" not in console.file.getvalue() and not skipped.str.contains("<bytes>").any()
    assert "holds no pixel data" in skipped[str(study / "empty.dcm")]
    assert len(pd.read_parquet(os.path.join(out, "predictions.parquet"))) == 1
    assert "skipped 2 input(s)" in console.file.getvalue()

    (tmp_path / "empty").mkdir()
    for bad, message in ((tmp_path / "empty", "no images in"),
                         (tmp_path / "nowhere", "input not found")):
        assert main(["predict", str(bad), "--ensemble", ensemble, "--out",
                     str(tmp_path / "o2")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and str(bad) in err
    only_bad = tmp_path / "bad" / "s"
    only_bad.mkdir(parents=True)
    (only_bad / "x.png").write_bytes(b"nothing")
    with pytest.raises(DataError, match="none of the 1 images could be used"):
        run_predict([str(tmp_path / "bad")], ensemble=ensemble, out=str(tmp_path / "o3"),
                    console=_console())
    assert not os.path.exists(tmp_path / "o3")


def test_collect_names_the_study_of_loose_files(tmp_path):
    for name in ("a/s1/1.png", "a/s1/2.png", "a/s2/1.jpg", "a/s2/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    got = collect_images([str(tmp_path / "a")]).images
    assert sorted(got["study_id"]) == ["s1", "s1", "s2"]
    loose = collect_images([str(tmp_path / "a" / "s1" / "1.png")]).images
    assert list(loose["study_id"]) == ["s1"]


def test_studies_of_the_same_name_in_different_places_stay_apart(tmp_path):
    for name in ("merge/p1/study1/1.png", "merge/p2/study1/1.png", "siteA/pat/study1/1.png",
                 "siteB/pat/study1/1.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    two = collect_images([str(tmp_path / "merge" / "p1" / "study1"),
                          str(tmp_path / "merge" / "p2" / "study1")]).images
    assert sorted(two["study_id"]) == ["p1/study1", "p2/study1"]
    sites = collect_images([str(tmp_path / "siteA"), str(tmp_path / "siteB")]).images
    assert sorted(sites["study_id"]) == ["siteA/pat/study1", "siteB/pat/study1"]
    files = collect_images([str(tmp_path / "merge" / "p1" / "study1" / "1.png"),
                            str(tmp_path / "merge" / "p2" / "study1" / "1.png")]).images
    assert files["study_id"].nunique() == 2


def test_the_patient_comes_from_the_path_when_one_study_or_one_patient_is_given(tiny_root):
    from raysearch.inference.predict import collect_images

    patient = min(os.listdir(os.path.join(tiny_root, "MURA-v1.1", "valid", "XR_ELBOW")))
    folder = os.path.join(tiny_root, "MURA-v1.1", "valid", "XR_ELBOW", patient)
    study = os.path.join(folder, min(os.listdir(folder)))
    for given in (folder, study, os.path.join(study, min(os.listdir(study)))):
        images = collect_images([given]).images
        assert (images["patient_id"] == patient).all(), (given, images["patient_id"].tolist())


def test_an_input_url_that_cannot_be_read_is_one_line_naming_it(ensemble, tmp_path, capsys):
    """A host that refuses the connection, a scheme nobody knows: one line naming the input and
    exit 2 (were `unexpected ConnectionRefusedError` and `unexpected ValueError: Protocol not
    known`, exit 1)."""
    from raysearch.cli import main
    from raysearch.errors import ConfigError

    with pytest.raises(DataError, match=r"^cannot read input ftp://127\.0\.0\.1:9/y\.png: "):
        collect_images(["ftp://127.0.0.1:9/y.png"])
    with pytest.raises(ConfigError, match=r"^foo://x/y\.png: unknown URL scheme foo://"):
        collect_images(["foo://x/y.png"])
    for url in ("ftp://127.0.0.1:9/y.png", "foo://x/y.png"):
        assert main(["predict", "--ensemble", ensemble, url,
                     "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("raysearch: error: ") and url in err and "\n" not in err


def test_output_that_is_not_a_terminal_gets_no_progress_bar_remnant(tmp_path, ensemble):
    """Piped or logged, `predict` writes its lines and nothing else: the progress bar left an
    empty line before them (so a refusal was two lines, the first one blank)."""
    bad = tmp_path / "notimg.png"
    bad.write_text("hello")
    console = _console()
    with pytest.raises(DataError, match="none of the 1 images could be used"):
        run_predict([str(bad)], ensemble=ensemble, out=str(tmp_path / "out"), console=console)
    assert console.file.getvalue() == ""
