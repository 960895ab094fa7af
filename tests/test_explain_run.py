"""Tests for ``raysearch explain`` (raysearch.explain.run and the CLI): the files it writes, the
images it picks, and one clear line for each mistake."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raysearch.cli import main
from raysearch.data.mura import read_mura
from raysearch.explain.run import run_explain
from tests.inference.test_predictor import two_member_ensemble


@pytest.fixture
def ensemble(tmp_path, tiny_root):
    folder = two_member_ensemble(tmp_path / "exp")
    from raysearch.storage import atomic_write_parquet

    atomic_write_parquet(read_mura(tiny_root), str(tmp_path / "exp" / "manifest.parquet"))
    return folder


def _a_test_study(tiny_root) -> tuple[str, pd.DataFrame]:
    manifest = read_mura(tiny_root)
    test = manifest[manifest["split"] == "test"]
    counts = test.groupby("study_id").size()
    study = str(counts[counts >= 2].index[0])
    return study, test[test["study_id"] == study]


def test_a_study_is_explained_per_member_and_for_the_ensemble(tmp_path, tiny_root, ensemble):
    study, images = _a_test_study(tiny_root)
    out = str(tmp_path / "out")
    table = run_explain(ensemble=ensemble, studies=[study], method="hirescam", out=out,
                        device="cpu")
    assert len(table) == 3 * len(images)  # members a, b and the ensemble per image
    assert set(table["member"]) == {"a", "b", "ensemble"}
    assert set(table["label"]) == {"abnormal"} and set(table["method"]) == {"hirescam"}
    saved = pd.read_parquet(os.path.join(out, "explanations.parquet"))
    pd.testing.assert_frame_equal(saved, table)
    for row in table.itertuples():
        heat = np.load(os.path.join(out, row.map_path))
        with Image.open(row.image_path) as img:
            assert heat.shape == (img.height, img.width)  # the original frame
        assert heat[row.peak_y, row.peak_x] == heat.max()
        assert 0.0 <= row.probability <= 1.0
        if row.member == "ensemble":
            assert heat.max() == pytest.approx(1.0) or heat.max() == 0.0
    ens = table[table["member"] == "ensemble"]
    members = table[table["member"] != "ensemble"].pivot(index="image_path", columns="member",
                                                         values="probability")
    np.testing.assert_allclose(ens.set_index("image_path")["probability"].loc[members.index],
                               members.mean(axis=1), atol=1e-6)
    overlays = os.listdir(os.path.join(out, "overlays", study.replace("/", "_")))
    assert len(overlays) == len(images)
    sheet = os.path.join(out, "studies", study.replace("/", "_") + ".png")
    with Image.open(sheet) as img:
        assert img.width > img.height / len(images)
    assert not [f for _, _, files in os.walk(out) for f in files if ".tmp-" in f]


def test_worst_picks_confident_errors_on_test(tmp_path, ensemble):
    table = run_explain(ensemble=ensemble, worst=1, out=str(tmp_path / "out"), device="cpu",
                        label="normal")
    assert set(table["error"]) <= {"FP", "FN"} and len(table) > 0
    assert set(table["label"]) == {"normal"}
    assert table.groupby("error")["study_id"].nunique().max() == 1


@pytest.mark.parametrize("case", ["unknown study", "missing checkpoint", "no layer",
                                  "unknown label", "nothing chosen"])
def test_mistakes_get_one_clear_line(tmp_path, tiny_root, ensemble, capsys, monkeypatch, case):
    args = ["explain", "--ensemble", ensemble, "--out", str(tmp_path / "o")]
    study, _ = _a_test_study(tiny_root)
    if case == "unknown study":
        args += ["--studies", "valid/XR_HAND/patient99999/study1"]
        expected = "unknown study id valid/XR_HAND/patient99999/study1"
    elif case == "missing checkpoint":
        members = pd.read_parquet(os.path.join(ensemble, "members.parquet"))
        os.remove(os.path.join(members["best_checkpoint"][1], "model.pt"))
        args += ["--studies", study]
        expected = "trial b: model.pt is missing"
    elif case == "no layer":
        from raysearch.models import registry

        monkeypatch.delitem(registry.CAM_LAYERS, "resnet18")
        args += ["--studies", study]
        expected = "member b: architecture 'resnet18' has no registered explanation layer"
    elif case == "unknown label":
        args += ["--studies", study, "--label", "fracture"]
        expected = "unknown --label 'fracture'"
    else:
        expected = "give exactly one of INPUT..., --studies ID... or --worst N"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_audit_from_the_command_line_finds_the_annotations_from_the_manifest(tmp_path, ensemble,
                                                                               capsys):
    out = tmp_path / "audit"
    assert main(["explain", "--audit", "--ensemble", ensemble, "--max-images", "2",
                 "--out", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "shortcut audit (flag: marker share > 0.01)" in text and "ensemble" in text
    summary = pd.read_parquet(out / "audit.parquet")
    assert list(summary["model"]) == ["a", "b", "ensemble"]
    assert (summary["n_images"] == 2).all()
    # The boxes were found beside MURA-v1.1: at least one image has a box of some kind.
    per_image = pd.read_parquet(out / "audit_images.parquet")
    assert per_image[["finding_area", "marker_area"]].notna().any().any()
    assert main(["explain", "--audit", "--ensemble", ensemble, "--worst", "1"]) == 2


def test_without_the_grad_cam_extra_explain_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    from raysearch.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytorch_grad_cam" else real(name, *a))
    assert main(["explain", "some.png"]) == 2
    assert capsys.readouterr().err.strip() == (
        "raysearch: error: raysearch explain needs the grad-cam package: "
        "pip install 'raysearch[explain]' (or pip install grad-cam)")
