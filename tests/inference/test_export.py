"""Tests for `raysearch export` (raysearch.inference.export): an ensemble's members written as
TorchScript and ONNX files give the predictor's probabilities on the same images, loaded with
torch.jit and onnxruntime alone; the manifest carries the preprocessing and the weights."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from raysearch.cli import main
from raysearch.data.images import preprocess_image
from raysearch.data.mura import read_mura
from raysearch.errors import ConfigError
from raysearch.inference.export import ExportedEnsemble, export_ensemble
from raysearch.inference.predictor import Predictor
from tests.test_api import make_search


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory):
    return os.path.join(make_search(str(tmp_path_factory.mktemp("exp"))), "ensemble")


@pytest.fixture(scope="module")
def images(tiny_root):
    manifest = read_mura(tiny_root)
    return manifest["image_path"].head(6).tolist()


@pytest.fixture(scope="module")
def reference(ensemble_dir, images):
    return Predictor.from_dir(ensemble_dir, device="cpu").predict(images)


@pytest.fixture(scope="module")
def exported(ensemble_dir, tmp_path_factory):
    """format -> export folder, each written once (TorchScript through the command line)."""
    root = tmp_path_factory.mktemp("exports")
    cache: dict[str, str] = {}

    def get(fmt: str) -> str:
        if fmt not in cache:
            out = str(root / fmt)
            if fmt == "torchscript":
                assert main(["export", "--ensemble", ensemble_dir, "--format", fmt,
                             "--out", out]) == 0
            else:
                pytest.importorskip("onnxruntime")
                export_ensemble(ensemble_dir, format=fmt, out=out)
            cache[fmt] = out
        return cache[fmt]

    return get


def _run_member(fmt: str, path: str, x: np.ndarray) -> np.ndarray:
    """One exported file run by its own runtime, without raysearch's model code."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["image"]
        return session.run(["probs"], {"image": x})[0]
    module = torch.jit.load(path, map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_files_give_the_predictors_probabilities(fmt, exported, images, reference):
    out = exported(fmt)
    with open(os.path.join(out, "export.json")) as f:
        manifest = json.load(f)
    assert manifest["format"] == fmt
    pre = manifest["preprocess"]
    assert pre["input"] == {"name": "image", "dtype": "uint8", "shape": ["batch", 1, "S", "S"]}
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406]) and pre["channels"] == 3
    assert manifest["output"]["labels"] == ["abnormal"]
    members = {m["trial_id"]: m for m in manifest["members"]}
    assert {t: (m["weight"], m["image_size"], m["arch"]) for t, m in members.items()} == {
        "b": (0.75, 32, "resnet18"), "a": (0.25, 48, "mobilenet_v3_small")}
    # The manifest alone says how to run them: preprocess at each member's size, run, weigh.
    combined = 0.0
    for tid, m in members.items():
        x = np.stack([preprocess_image(p, image_size=m["image_size"]) for p in images])[:, None]
        probs = _run_member(fmt, os.path.join(out, m["file"]), x)
        np.testing.assert_allclose(probs, reference.members[tid], rtol=0, atol=1e-5)
        combined = combined + m["weight"] * probs.astype(np.float64)
    np.testing.assert_allclose(combined, reference.probs, rtol=0, atol=1e-5)
    # ... and the reader does the same
    probs, by_member = ExportedEnsemble(out).predict(images)
    np.testing.assert_allclose(probs, reference.probs, rtol=0, atol=1e-5)
    assert set(by_member) == {"a", "b"}


def test_the_onnx_file_is_a_valid_model_with_a_dynamic_batch(exported):
    onnx = pytest.importorskip("onnx")
    out = exported("onnx")
    model = onnx.load(os.path.join(out, "b.onnx"))
    onnx.checker.check_model(model)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 32, 32]


def test_a_file_changed_after_export_is_refused(exported, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(exported("torchscript"), out)
    with open(os.path.join(out, "a.pt"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(ConfigError, match="a.pt does not match its sha256"):
        ExportedEnsemble(out)


def test_export_command_writes_the_files_and_errors_are_one_line(exported, ensemble_dir,
                                                                   tmp_path, capsys):
    assert sorted(os.listdir(exported("torchscript"))) == ["a.pt", "b.pt", "export.json"]
    capsys.readouterr()
    assert main(["export", "--ensemble", str(tmp_path / "nothing"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such ensemble or experiment folder" in err and "\n" not in err
    with pytest.raises(ConfigError, match="--format: unknown value 'tflite'"):
        export_ensemble(ensemble_dir, format="tflite")


def test_a_folder_that_is_not_a_whole_export_is_refused_by_name(exported, ensemble_dir,
                                                                tmp_path):
    """The wrong folder (an ensemble, a typo), a damaged manifest or a missing member file: a
    ConfigError naming the path, not a FileNotFoundError, JSONDecodeError or KeyError."""
    with pytest.raises(ConfigError, match=f"not an export folder: {tmp_path / 'nothing'}"):
        ExportedEnsemble(str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="not an export folder: .*ensemble .no export.json"):
        ExportedEnsemble(ensemble_dir)
    out = str(tmp_path / "copy")
    shutil.copytree(exported("torchscript"), out)
    manifest = os.path.join(out, "export.json")
    with open(manifest) as f:
        good = f.read()
    os.remove(os.path.join(out, "b.pt"))
    with pytest.raises(ConfigError, match=r"b\.pt is missing \(a member listed in"):
        ExportedEnsemble(out)
    for text, why in [("{not json", "Expecting"), (json.dumps({"format": "tflite"}), "tflite"),
                      (good.replace('"sha256"', '"sha"'), "no 'sha256'")]:
        with open(manifest, "w") as f:
            f.write(text)
        with pytest.raises(ConfigError, match=f"export.json is not a manifest .*{why}"):
            ExportedEnsemble(out)


def test_an_export_predicts_no_images_as_an_empty_batch(exported):
    probs, by_member = ExportedEnsemble(exported("torchscript")).predict([])
    assert probs.shape == (0, 1) and {m.shape for m in by_member.values()} == {(0, 1)}


def test_an_export_over_an_earlier_one_leaves_only_what_its_manifest_lists(exported,
                                                                          ensemble_dir, tmp_path):
    """Exporting again into a folder (another ensemble, the other format) removes the earlier
    manifest's member files it does not write, and nothing else."""
    out = str(tmp_path / "again")
    shutil.copytree(exported("torchscript"), out)
    manifest = os.path.join(out, "export.json")
    with open(manifest) as f:
        earlier = json.load(f)
    earlier["members"].append({**earlier["members"][0], "trial_id": "gone", "file": "gone.pt"})
    earlier["members"].append({**earlier["members"][0], "trial_id": "x", "file": "../outside"})
    with open(manifest, "w") as f:
        json.dump(earlier, f)
    for name in ("gone.pt", "notes.txt"):
        with open(os.path.join(out, name), "w") as f:
            f.write("x")
    (tmp_path / "outside").write_text("not the export's")
    export_ensemble(ensemble_dir, format="torchscript", out=out)
    assert sorted(os.listdir(out)) == ["a.pt", "b.pt", "export.json", "notes.txt"]
    assert (tmp_path / "outside").exists()
    assert set(ExportedEnsemble(out).predict([])[1]) == {"a", "b"}
