"""Tests for the synthetic MURA-format generator (data stage, demo input)."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from raysearch.data.synth import DEMO_SIZES, _plan, _render, make_demo_data
from raysearch.errors import ConfigError, DataError

IMAGE_LINE = re.compile(
    r"^MURA-v1\.1/(train|valid)/XR_(ELBOW|FINGER|FOREARM|HAND|HUMERUS|SHOULDER|WRIST)/"
    r"patient\d{5}/study\d+_(positive|negative)/image\d+\.png$"
)
STUDY_LINE = re.compile(
    r"^MURA-v1\.1/(train|valid)/XR_[A-Z]+/patient\d{5}/study\d+_(positive|negative)/,([01])$"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return Path(make_demo_data(str(tmp_path_factory.mktemp("synth")), size="tiny", seed=3))


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_any_worker_count(tmp_path, tiny):
    again = make_demo_data(str(tmp_path / "a"), size="tiny", seed=3, num_workers=2)
    assert _digest(Path(again)) == _digest(tiny)
    other = make_demo_data(str(tmp_path / "b"), size="tiny", seed=4, num_workers=1)
    assert _digest(Path(other)) != _digest(tiny)


def test_layout_and_csv_format_exact(tiny):
    assert tiny.name == "MURA-v1.1"
    # MURA's own files, and a hidden marker that lets --overwrite replace this folder alone
    assert sorted(p.name for p in tiny.iterdir()) == [
        ".raysearch-demo.json",
        "train",
        "train_image_paths.csv",
        "train_labeled_studies.csv",
        "valid",
        "valid_image_paths.csv",
        "valid_labeled_studies.csv",
    ]
    on_disk = {str(p.relative_to(tiny.parent)) for p in tiny.rglob("*.png")}
    listed, study_dirs = set(), {}
    for split in ("train", "valid"):
        text = (tiny / f"{split}_image_paths.csv").read_text()
        assert text.endswith("\n") and "\r" not in text
        lines = text.splitlines()
        assert all(IMAGE_LINE.match(line) for line in lines), lines[:3]  # no header line
        assert all(line.split("/")[1] == split for line in lines)
        listed |= set(lines)
        for line in (tiny / f"{split}_labeled_studies.csv").read_text().splitlines():
            m = STUDY_LINE.match(line)
            assert m, line
            assert m[3] == ("1" if m[2] == "positive" else "0")  # CSV label agrees with folder
            study_dirs[line.rsplit(",", 1)[0]] = int(m[3])
    assert listed == on_disk
    assert {line.rsplit("/", 1)[0] + "/" for line in listed} == set(study_dirs)
    # Views are numbered 1..n within each study, with 1-4 views.
    per_study: dict[str, list[int]] = {}
    for line in listed:
        study, image = line.rsplit("/", 1)
        per_study.setdefault(study, []).append(int(image[5:-4]))
    assert all(sorted(v) == list(range(1, len(v) + 1)) and len(v) <= 4 for v in per_study.values())


def test_tiny_counts_and_disjoint_patients(tiny):
    images = list(tiny.rglob("*.png"))
    assert 100 <= len(images) <= 220
    patients = {
        split: {p.name for p in (tiny / split).glob("XR_*/patient*")}
        for split in ("train", "valid")
    }
    spec = DEMO_SIZES["tiny"]
    assert len(patients["train"]) == spec.train_patients
    assert len(patients["valid"]) == spec.valid_patients
    assert not patients["train"] & patients["valid"]
    labels = [int(line[-1]) for line in (tiny / "train_labeled_studies.csv").read_text().split()]
    assert 0 < sum(labels) < len(labels)


def test_images_are_radiograph_like(tiny):
    for path in sorted(tiny.rglob("*.png"))[:20]:
        with Image.open(path) as im:
            assert im.mode in ("L", "RGB")
            assert max(im.size) <= 512 and min(im.size) >= 32
            a = np.asarray(im.convert("L"), np.float32)
        assert a.std() > 10  # bone and tissue on a background, not a flat field


def test_small_plan_counts():
    jobs, csv_rows = _plan(DEMO_SIZES["small"], seed=0, label_noise=0.03)
    train, valid = len(csv_rows["train"][0]), len(csv_rows["valid"][0])
    assert 1200 <= train <= 1800 and 300 <= valid <= 500
    assert len(jobs) == train + valid


def test_small_has_rgb_inverted_and_markers():
    # Rendering every 12th image of the "small" plan exercises the same code as make_demo_data
    # at a twelfth of the cost.
    spec = DEMO_SIZES["small"]
    jobs, _ = _plan(spec, seed=0, label_noise=0.03)
    modes, sides, inverted, corner_text = {}, [], 0, 0
    for job in jobs[::12]:
        with Image.open(io.BytesIO(_render(job, spec.min_side, spec.max_side))) as im:
            modes[im.mode] = modes.get(im.mode, 0) + 1
            sides.append(max(im.size))
            a = np.asarray(im.convert("L"), np.float32)
        inverted += np.median(a) > 128  # a white background
        h, w = a.shape
        corners = [a[: h // 6, : w // 4], a[: h // 6, -w // 4 :], a[-h // 5 :, : w // 4]]
        corner_text += any((c > 240).sum() > 4 and np.median(c) < 100 for c in corners)
    assert modes.get("RGB", 0) > 0 and modes.get("L", 0) > modes.get("RGB", 0)
    assert 0 < inverted < len(sides) // 4
    assert corner_text > len(sides) // 10  # bright L/R letters on a dark corner
    assert min(sides) >= DEMO_SIZES["small"].min_side and max(sides) <= 512
    assert len(set(sides)) > 20  # sizes vary


def test_writes_to_memory_url():
    fs = fsspec.filesystem("memory")
    root = make_demo_data("memory://synth-test/demo", size="tiny", seed=1)
    try:
        assert root == "memory://synth-test/demo/MURA-v1.1"
        lines = fs.cat_file("/synth-test/demo/MURA-v1.1/valid_image_paths.csv").decode().split()
        first = fs.cat_file(f"/synth-test/demo/{lines[0]}")
        Image.open(io.BytesIO(first)).verify()
    finally:
        fs.rm("/synth-test", recursive=True)


def test_refuses_existing_folder_and_bad_arguments(tmp_path):
    make_demo_data(str(tmp_path), size="tiny")
    with pytest.raises(DataError, match="already exists"):
        make_demo_data(str(tmp_path), size="tiny")
    stale = tmp_path / "MURA-v1.1" / "stale.txt"
    stale.write_text("x")
    make_demo_data(str(tmp_path), size="tiny", overwrite=True)
    assert not stale.exists()
    with pytest.raises(ConfigError, match="huge"):
        make_demo_data(str(tmp_path / "x"), size="huge")
    with pytest.raises(ConfigError, match="label_noise"):
        make_demo_data(str(tmp_path / "x"), label_noise=0.7)


def test_label_noise_flips_some_labels(tmp_path):
    clean = make_demo_data(str(tmp_path / "clean"), size="tiny", seed=5, label_noise=0.0)
    noisy = make_demo_data(str(tmp_path / "noisy"), size="tiny", seed=5, label_noise=0.3)

    def labels(root: str) -> list[str]:
        return (Path(root) / "train_labeled_studies.csv").read_text().split()

    a, b = labels(clean), labels(noisy)
    assert len(a) == len(b)  # the same studies, only the labels differ
    flipped = sum(x != y for x, y in zip(a, b))
    assert 0 < flipped < len(a) // 2


def test_overwrite_replaces_demo_data_but_never_a_folder_demo_data_did_not_make(tmp_path):
    root = Path(make_demo_data(str(tmp_path), size="tiny", num_workers=1))
    with pytest.raises(DataError, match="already exists; choose another folder, or --overwrite"):
        make_demo_data(str(tmp_path), size="tiny", num_workers=1)
    (root / "stale.png").write_bytes(b"x")
    make_demo_data(str(tmp_path), size="tiny", num_workers=1, overwrite=True)
    assert not (root / "stale.png").exists() and (root / "train_image_paths.csv").exists()
    real = tmp_path / "real"  # e.g. the real MURA-v1.1 under the same parent
    (real / "MURA-v1.1" / "train").mkdir(parents=True)
    (real / "MURA-v1.1" / "train" / "keep.png").write_bytes(b"x")
    with pytest.raises(DataError, match="was not made by raysearch demo-data"):
        make_demo_data(str(real), size="tiny", num_workers=1, overwrite=True)
    assert (real / "MURA-v1.1" / "train" / "keep.png").exists()


def test_a_negative_seed_is_one_line_exit_2_before_any_file(tmp_path, capsys):
    """`demo-data --seed -4` was `unexpected ValueError: expected non-negative integer`, exit 1."""
    from raysearch.cli import main

    assert main(["demo-data", str(tmp_path / "d"), "--seed", "-4", "--size", "tiny"]) == 2
    assert capsys.readouterr().err.strip() == "raysearch: error: seed must be an int >= 0, got -4"
    assert not (tmp_path / "d").exists()
