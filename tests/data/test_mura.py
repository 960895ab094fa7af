"""Tests for the MURA reader, manifest and patient split (data stage)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from raysearch import storage
from raysearch.data.mura import (
    BODY_PARTS,
    MANIFEST_COLUMNS,
    find_mura_root,
    read_mura,
    skipped_counts,
    skipped_frame,
    summarize,
    summary_table,
)
from raysearch.data.split import split_patients
from raysearch.data.synth import make_demo_data
from raysearch.errors import ConfigError, DataError


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A generated "tiny" MURA-v1.1 folder; read-only, copy it before changing anything."""
    return Path(make_demo_data(str(tmp_path_factory.mktemp("mura")), size="tiny", seed=7))


@pytest.fixture(scope="session")
def tiny_manifest(tiny_root) -> pd.DataFrame:
    return read_mura(str(tiny_root), val_fraction=0.2, seed=0)


@pytest.fixture
def root(tiny_root, tmp_path) -> Path:
    """A private copy of the tiny dataset to break."""
    return Path(shutil.copytree(tiny_root, tmp_path / "MURA-v1.1"))


def lines(root: Path, name: str) -> list[str]:
    return (root / name).read_text().splitlines()


def write_lines(root: Path, name: str, rows: list[str]) -> None:
    (root / name).write_text("".join(f"{r}\n" for r in rows))


# --- reading a good dataset -------------------------------------------------------------------


def test_manifest_matches_what_was_written(tiny_root, tiny_manifest):
    m = tiny_manifest
    assert list(m.columns) == MANIFEST_COLUMNS
    on_disk = sorted(str(p) for p in tiny_root.rglob("*.png"))
    assert sorted(m["image_path"]) == on_disk
    for official, split in (("train", None), ("valid", "test")):
        sub = m[m["official_split"] == official]
        assert len(sub) == len(lines(tiny_root, f"{official}_image_paths.csv"))
        studies = lines(tiny_root, f"{official}_labeled_studies.csv")
        assert sub["study_id"].nunique() == len(studies)
        expected = {s.split("/", 1)[1].rsplit("_", 1)[0]: int(s[-1]) for s in studies}
        assert dict(zip(sub["study_id"], sub["label"])) == expected
        if split:
            assert set(sub["split"]) == {split}
    assert set(m.loc[m["official_split"] == "train", "split"]) == {"train", "val"}
    assert m.attrs["unlisted"] == 0 and m.attrs["skipped"].empty


def test_manifest_values_and_order(tiny_manifest):
    m = tiny_manifest
    assert m["view"].dtype == np.int64 and m["label"].dtype == np.int64
    assert set(m["body_part"]) <= set(BODY_PARTS)
    assert m["patient_id"].str.fullmatch(r"patient\d{5}").all()
    assert m["study_id"].str.fullmatch(r"(train|valid)/XR_[A-Z]+/patient\d{5}/study\d+").all()
    assert (m["study_id"].str.split("/").str[2] == m["patient_id"]).all()
    assert m.equals(m.sort_values(["official_split", "study_id", "view"]).reset_index(drop=True))
    assert not m.duplicated(["study_id", "view"]).any()
    assert all(Path(p).is_absolute() for p in m["image_path"])


def test_root_may_be_the_folder_or_its_parent(tiny_root, tiny_manifest):
    assert find_mura_root(str(tiny_root.parent)) == str(tiny_root)
    assert find_mura_root(str(tiny_root) + "/") == str(tiny_root)
    m = read_mura(str(tiny_root.parent), val_fraction=0.2, seed=0)
    pd.testing.assert_frame_equal(m, tiny_manifest)
    with pytest.raises(DataError, match="no MURA dataset"):
        find_mura_root(str(tiny_root / "train"))
    with pytest.raises(DataError, match="does not exist"):
        find_mura_root(str(tiny_root / "nowhere"))


def test_csv_quirks_no_header_prefix_and_trailing_slash(root):
    # Real MURA: no header row, every path starts with MURA-v1.1/, study paths end with "/".
    first_study = lines(root, "train_labeled_studies.csv")[0]
    assert first_study.startswith("MURA-v1.1/train/") and first_study[-3:-2] == "/"
    m = read_mura(str(root))
    assert first_study.split("/", 1)[1].rsplit("_", 1)[0] in set(m["study_id"])  # first line kept
    # A study path written without its trailing slash reads the same.
    studies = [s.replace("/,", ",") for s in lines(root, "train_labeled_studies.csv")]
    write_lines(root, "train_labeled_studies.csv", studies)
    pd.testing.assert_frame_equal(read_mura(str(root)), m)


def test_memory_url_root(tiny_root, tiny_manifest):
    fs = fsspec.filesystem("memory")
    try:
        for path in tiny_root.rglob("*"):
            if path.is_file():
                fs.pipe_file(f"/data-test/{path.relative_to(tiny_root.parent)}", path.read_bytes())
        m = read_mura("memory://data-test", val_fraction=0.2, seed=0)
        assert m["image_path"].str.startswith("memory://data-test/MURA-v1.1/train/").any()
        local = tiny_manifest.assign(
            image_path=tiny_manifest["image_path"].str.replace(
                str(tiny_root.parent), "memory://data-test", regex=False
            )
        )
        pd.testing.assert_frame_equal(m, local)
        assert storage.read_bytes(m["image_path"].iat[0])[:4] == b"\x89PNG"
    finally:
        fs.rm("/data-test", recursive=True)


def test_unlisted_files_are_counted_not_errors(root):
    extra = root / "train" / "XR_HAND" / "patient99999" / "study1_negative"
    extra.mkdir(parents=True)
    shutil.copy(next(root.rglob("*.png")), extra / "image1.png")
    (root / "notes.txt").write_text("x")
    (root / "train_image_paths_old.csv").write_text("x\n")  # only PNGs count as unlisted
    (extra / "labels.csv").write_text("x\n")
    m = read_mura(str(root))
    assert m.attrs["unlisted"] == 1
    assert "patient99999" not in set(m["patient_id"])


def test_skipped_is_a_frame_and_manifest_writes_to_parquet(root, tmp_path):
    (root / "train_image_paths.csv").write_text(
        (root / "train_image_paths.csv").read_text()
        + "MURA-v1.1/train/XR_HAND/patient00001/study9_negative/image1.png\n"
    )
    m = read_mura(str(root), skip_bad=True)
    skipped = m.attrs["skipped"]
    assert isinstance(skipped, pd.DataFrame)
    assert list(skipped.columns) == ["path", "reason", "entry"]
    assert skipped.values.tolist() == [
        [
            "MURA-v1.1/train/XR_HAND/patient00001/study9_negative/image1.png",
            "image listed but missing",
            "image",
        ]
    ]
    m.attrs = {}  # Parquet metadata cannot hold a DataFrame
    back = storage.read_parquet(storage.atomic_write_parquet(m, tmp_path / "manifest.parquet"))
    pd.testing.assert_frame_equal(back, m)


# --- patient split ----------------------------------------------------------------------------


def test_split_is_by_patient_and_seeded(tiny_root, tiny_manifest):
    m = tiny_manifest
    per_patient = m.groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all()  # no patient in two splits
    train_patients = m.loc[m["official_split"] == "train", "patient_id"].nunique()
    val_patients = m.loc[m["split"] == "val", "patient_id"].nunique()
    assert val_patients == round(0.2 * train_patients)
    again = read_mura(str(tiny_root), val_fraction=0.2, seed=0)
    assert again["split"].tolist() == m["split"].tolist()
    other = read_mura(str(tiny_root), val_fraction=0.2, seed=1)
    assert other["split"].tolist() != m["split"].tolist()
    none = read_mura(str(tiny_root), val_fraction=0.0, seed=0)
    assert set(none["split"]) == {"train", "test"}


def _studies(n_per_stratum: int) -> pd.DataFrame:
    rows, k = [], 0
    for part in BODY_PARTS:
        for label in (0, 1):
            for _ in range(n_per_stratum):
                k += 1
                patient = f"patient{k:05d}"
                rows.append((patient, f"train/XR_{part}/{patient}/study1", part, label))
                # A second, normal study of another part must not change the patient's stratum.
                rows.append((patient, f"train/XR_WRIST/{patient}/study2", "WRIST", 0))
    return pd.DataFrame(rows, columns=["patient_id", "study_id", "body_part", "label"])


def test_split_patients_is_stratified_and_order_free():
    studies = _studies(20)
    split = split_patients(studies, val_fraction=0.25, seed=3)
    first = studies.drop_duplicates("patient_id").assign(split=lambda d: d["patient_id"].map(split))
    per_stratum = first.groupby(["body_part", "label"])["split"].apply(lambda s: (s == "val").sum())
    assert (per_stratum == 5).all()
    shuffled = studies.sample(frac=1.0, random_state=0)
    assert split_patients(shuffled, val_fraction=0.25, seed=3) == split
    assert split_patients(studies, val_fraction=0.25, seed=4) != split


def test_split_patients_rounds_to_the_total():
    studies = _studies(3)  # 14 strata of 3 patients: per-stratum rounding alone would give 14
    split = split_patients(studies, val_fraction=0.1, seed=0)
    assert sum(v == "val" for v in split.values()) == round(0.1 * 42)
    with pytest.raises(ConfigError, match="val_fraction"):
        split_patients(studies, val_fraction=1.0, seed=0)


# --- bad input --------------------------------------------------------------------------------


def _first_image(root: Path, official: str = "train") -> tuple[str, Path]:
    line = lines(root, f"{official}_image_paths.csv")[0]
    return line, root.parent / line


def deny(monkeypatch, how: str, method: str, path: Path, *, enforced: bool) -> None:
    """Make ``path`` unreadable: ``chmod`` it (skipped where permissions are not enforced, as for
    root), or make the local filesystem's ``method`` raise PermissionError for it, as the kernel
    does for a user without the permission."""
    if how == "chmod":
        if not enforced:
            pytest.skip("this user ignores file permissions (root); the simulated case covers it")
        path.chmod(0)  # the test restores it
        return
    from fsspec.implementations.local import LocalFileSystem

    original = getattr(LocalFileSystem, method)

    def denied(self, p, *args, **kwargs):
        if str(p).rstrip("/") == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return original(self, p, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, method, denied)


@pytest.mark.parametrize("how", ["simulated", "chmod"])
def test_unreadable_csv_names_the_file_and_the_reason(
    root, monkeypatch, how, permissions_enforced
):
    csv = root / "train_labeled_studies.csv"
    deny(monkeypatch, how, "_open", csv, enforced=permissions_enforced)
    try:
        with pytest.raises(DataError) as err:
            read_mura(str(root))
    finally:
        csv.chmod(0o644)
    assert str(err.value) == f"cannot read {csv}: permission denied"


@pytest.mark.parametrize("how", ["simulated", "chmod"])
def test_unreadable_study_folder_is_not_reported_as_missing_images(
    root, monkeypatch, how, permissions_enforced
):
    line, image = _first_image(root)
    folder = image.parent
    study = line.rsplit("/", 1)[0] + "/"
    n_images = sum(i.startswith(study) for i in lines(root, "train_image_paths.csv"))
    deny(monkeypatch, how, "ls", folder, enforced=permissions_enforced)
    try:
        with pytest.raises(DataError) as err:
            read_mura(str(root))
        m = read_mura(str(root), skip_bad=True)
    finally:
        folder.chmod(0o755)
    text = str(err.value)
    reason = f"cannot read folder {folder} (permission denied)"
    assert f"{reason} ({n_images}): {line}" in text, text
    assert "image listed but missing" not in text
    skipped = skipped_frame(m)
    assert (skipped["reason"] == reason).sum() == n_images
    assert not m["image_path"].str.startswith(f"{folder}/").any()


def test_missing_csv(root):
    (root / "valid_labeled_studies.csv").unlink()
    with pytest.raises(DataError, match=r"valid_labeled_studies\.csv"):
        read_mura(str(root))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: p.unlink(), "image listed but missing"),
        (lambda p: p.write_bytes(b""), "not a readable PNG"),
        (lambda p: p.write_bytes(p.read_bytes()[:-40]), "truncated PNG"),
        (lambda p: p.write_bytes(b"GIF89a" + p.read_bytes()[6:]), "bad signature"),
    ],
    ids=["missing", "zero-bytes", "truncated", "not-png"],
)
def test_bad_image_files(root, damage, reason):
    line, path = _first_image(root)
    damage(path)
    with pytest.raises(DataError, match=reason) as err:
        read_mura(str(root))
    assert line in str(err.value) and "\n" not in str(err.value)
    m = read_mura(str(root), skip_bad=True)
    assert str(path) not in set(m["image_path"])
    skipped = skipped_frame(m)
    assert skipped["path"].tolist()[:1] == [line] and reason in skipped["reason"].iat[0]
    total = len(lines(root, "train_image_paths.csv")) + len(lines(root, "valid_image_paths.csv"))
    study_dropped = len(skipped) - 1  # a one-view study goes too, and is reported as well
    assert len(m) == total - 1 and study_dropped in (0, 1)


@pytest.mark.parametrize("padding", [b"\x00" * 4096, b"\x00" * 200_000, b"garbage"])
def test_png_with_bytes_after_iend_is_complete(root, padding):
    """Padding after IEND (common in recovered files) is no truncation: the decoder reads it."""
    from raysearch.data.images import preprocess_image

    _, path = _first_image(root)
    path.write_bytes(path.read_bytes() + padding)
    m = read_mura(str(root))
    assert str(path) in set(m["image_path"]) and m.attrs["skipped"].empty
    assert preprocess_image(str(path), image_size=16).shape == (16, 16)


def test_check_images_false_skips_the_png_check(root):
    _, path = _first_image(root)
    path.write_bytes(path.read_bytes()[:-40])
    m = read_mura(str(root), check_images=False)
    assert str(path) in set(m["image_path"])


def test_label_disagreeing_with_folder(root):
    studies = lines(root, "train_labeled_studies.csv")
    bad = studies[0][:-1] + ("0" if studies[0].endswith("1") else "1")
    write_lines(root, "train_labeled_studies.csv", [bad, *studies[1:]])
    study_dir = bad.rsplit(",", 1)[0]
    with pytest.raises(DataError, match="disagrees with folder name") as err:
        read_mura(str(root))
    assert study_dir in str(err.value)
    m = read_mura(str(root), skip_bad=True)
    n_images = sum(line.startswith(study_dir) for line in lines(root, "train_image_paths.csv"))
    assert len(m.attrs["skipped"]) == 1 + n_images  # the study and each of its images
    # counted apart: a study is no image (the old line said "left out 1 + n bad image(s)")
    assert skipped_counts(m) == f"{n_images} image{'s' if n_images != 1 else ''} and 1 study"
    assert skipped_frame(m)["entry"].tolist() == ["study"] + ["image"] * n_images
    assert not m["image_path"].str.contains(study_dir, regex=False).any()


def test_unknown_body_part(root):
    line, path = _first_image(root)
    knee = line.replace(f"/XR_{line.split('/')[2][3:]}/", "/XR_KNEE/")
    (root.parent / knee).parent.mkdir(parents=True)
    shutil.copy(path, root.parent / knee)
    write_lines(root, "train_image_paths.csv", [*lines(root, "train_image_paths.csv"), knee])
    with pytest.raises(DataError, match="unknown body part XR_KNEE") as err:
        read_mura(str(root))
    assert knee in str(err.value)
    assert skipped_frame(read_mura(str(root), skip_bad=True))["path"].tolist() == [knee]


def test_study_without_images_and_image_without_study(root):
    images = lines(root, "train_image_paths.csv")
    study = images[0].rsplit("/", 1)[0] + "/"
    write_lines(root, "train_image_paths.csv", [i for i in images if not i.startswith(study)])
    with pytest.raises(DataError, match="study has no usable images") as err:
        read_mura(str(root))
    assert study in str(err.value)

    write_lines(root, "train_image_paths.csv", images)
    studies = lines(root, "train_labeled_studies.csv")
    write_lines(root, "train_labeled_studies.csv", [s for s in studies if not s.startswith(study)])
    with pytest.raises(DataError, match="study not in labeled CSV") as err:
        read_mura(str(root))
    assert images[0] in str(err.value)
    m = read_mura(str(root), skip_bad=True)
    assert len(m.attrs["skipped"]) == sum(i.startswith(study) for i in images)


def test_patient_in_both_official_splits_is_leakage(root):
    line, path = _first_image(root, "valid")
    patient = lines(root, "train_image_paths.csv")[0].split("/")[3]
    leaked = line.replace(line.split("/")[3], patient).replace("/study1_", "/study7_")
    (root.parent / leaked).parent.mkdir(parents=True)
    shutil.copy(path, root.parent / leaked)
    write_lines(root, "valid_image_paths.csv", [*lines(root, "valid_image_paths.csv"), leaked])
    label = "1" if "_positive/" in leaked else "0"
    studies = [*lines(root, "valid_labeled_studies.csv"), leaked.rsplit("/", 1)[0] + f"/,{label}"]
    write_lines(root, "valid_labeled_studies.csv", studies)
    with pytest.raises(DataError, match=f"test leakage.*{patient}"):
        read_mura(str(root))


def test_empty_dataset(root):
    for name in ("train_image_paths.csv", "valid_image_paths.csv"):
        (root / name).write_text("")
    for name in ("train_labeled_studies.csv", "valid_labeled_studies.csv"):
        (root / name).write_text("")
    with pytest.raises(DataError, match="no usable images"):
        read_mura(str(root))


def test_many_problems_make_one_line_with_counts(root):
    images = lines(root, "train_image_paths.csv")
    for line in images[:5]:
        (root.parent / line).unlink()
    with pytest.raises(DataError) as err:
        read_mura(str(root))
    msg = str(err.value)
    assert "\n" not in msg and "image listed but missing (5)" in msg and "(+2 more)" in msg
    assert "--skip-bad" in msg


def test_bad_val_fraction(tiny_root):
    with pytest.raises(ConfigError, match="val_fraction"):
        read_mura(str(tiny_root), val_fraction=-0.1)


# --- summaries --------------------------------------------------------------------------------


def test_summarize_totals(tiny_manifest):
    m = tiny_manifest
    s = summarize(m)
    total = s[(s["split"] == "all") & (s["body_part"] == "ALL")].iloc[0]
    assert total["images"] == len(m) and total["studies"] == m["study_id"].nunique()
    assert total["patients"] == m["patient_id"].nunique()
    assert total["normal_studies"] + total["abnormal_studies"] == total["studies"]
    parts = s[(s["split"] != "all") & (s["body_part"] != "ALL")]
    assert parts["images"].sum() == len(m) and parts["studies"].sum() == total["studies"]
    assert list(s["split"].drop_duplicates()) == ["train", "val", "test", "all"]


def test_summary_table_renders(tiny_manifest):
    m = tiny_manifest.copy()
    m.attrs = {"unlisted": 3, "skipped": pd.DataFrame({"path": ["a"], "reason": ["b"]})}
    out = io.StringIO()
    Console(file=out, width=100, color_system=None).print(summary_table(m, title="tiny"))
    text = out.getvalue()
    assert "tiny" in text and "train" in text and "test" in text
    assert f"{len(m):,}" in text
    assert "left out 1 study" in text and "3 PNG files" in text


def test_data_command_shows_the_split_the_space_uses(tiny_root, tmp_path, capsys):
    """`raysearch data --space` reads root, val_fraction and seed from the space, so the split it
    prints is the one `tune` will use (demo.sh printed 0.1 while the search used 0.15)."""
    from raysearch import cli

    space = tmp_path / "space.yaml"
    space.write_text(f"name: s\ndata: {{root: {tiny_root}, val_fraction: 0.4, seed: 3}}\n"
                     "space: {lr: {loguniform: [1.0e-4, 1.0e-3]}}\n")
    out = tmp_path / "manifest.parquet"
    assert cli.main(["data", "--space", str(space), "--out", str(out)]) == 0
    assert f"split: val_fraction 0.4 of the official train patients, seed 3 ({space})" in (
        capsys.readouterr().out)
    written = pd.read_parquet(out)
    expected = read_mura(str(tiny_root), val_fraction=0.4, seed=3)
    assert written["split"].tolist() == expected["split"].tolist()
    assert cli.main(["data", str(tiny_root), "--space", str(space), "--val-fraction", "0.2"]) == 0
    assert "val_fraction 0.2 of the official train patients, seed 3" in capsys.readouterr().out
