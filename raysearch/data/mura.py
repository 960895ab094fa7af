"""Data stage, the MURA reader: the image manifest, its task, and the patient-level split.

``read_mura`` turns a MURA-v1.1 folder (local path or fsspec URL) into a manifest DataFrame with
one row per image and these columns, in this order (later stages may rely on them):

    image_path      absolute local path or full URL of the PNG
    official_split  "train" or "valid" (the MURA folder it came from)
    split           "train" or "val" (official train, split by patient) or "test" (official valid)
    body_part       ELBOW, FINGER, FOREARM, HAND, HUMERUS, SHOULDER or WRIST
    patient_id      e.g. "patient00001"
    study_id        e.g. "train/XR_WRIST/patient00001/study1" (unique across the dataset)
    view            int, J of imageJ.png
    label           int, 1 abnormal / 0 normal (per study, copied to each of its images)

Rows are sorted by (official_split, study_id, view). ``manifest.attrs`` carries what was not
used: ``"unlisted"`` (number of PNG files on disk that no CSV lists; other files are not counted)
and ``"skipped"`` (a DataFrame with columns path, reason, entry: what ``skip_bad=True`` left
out, paths as written in the CSVs, entry "image" or "study" for the CSV row it is).
pandas cannot store a DataFrame in Parquet metadata, so clear ``attrs`` before ``to_parquet``.

The CSVs are the source of truth and every disagreement with the files is reported: by default
as one ``DataError`` line, with ``skip_bad=True`` as skipped records. Nothing is dropped silently.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from rich.table import Table

from raysearch import storage
from raysearch.data.dataset import Task
from raysearch.data.integrity import image_problem
from raysearch.data.roots import find_mura_root
from raysearch.data.split import split_patients
from raysearch.errors import ConfigError, DataError, name_some, os_reason

__all__ = [
    "BODY_PARTS",
    "MANIFEST_COLUMNS",
    "MURA_TASK",
    "find_mura_root",
    "read_mura",
    "skipped_counts",
    "skipped_frame",
    "split_patients",
    "summarize",
    "summary_table",
]

BODY_PARTS = ("ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST")
# MURA's task: one binary label per study, metrics per body part, a study's probability the mean
# of its views' (Rajpurkar et al. 2017, arXiv:1712.06957, sec. 3).
MURA_TASK = Task(name="mura", labels=("abnormal",), group="body_part", groups=BODY_PARTS,
                 aggregation="mean")
MANIFEST_COLUMNS = [
    "image_path", "official_split", "split", "body_part",
    "patient_id", "study_id", "view", "label",
]  # fmt: skip
OFFICIAL_SPLITS = ("train", "valid")
SPLITS = ("train", "val", "test")

# Paths inside the CSVs, after their first component (normally "MURA-v1.1/").
_STUDY_RE = re.compile(
    r"^(?P<official>train|valid)/XR_(?P<part>[A-Z]+)/(?P<patient>patient\d+)/"
    r"(?P<study>study\d+)_(?P<folder_label>positive|negative)$"
)
_IMAGE_RE = re.compile(r"^(?P<study_dir>.+)/image(?P<view>\d+)\.png$")


# ---------------------------------------------------------------------------------------------
# Locating the dataset


# ---------------------------------------------------------------------------------------------
# Reading


def read_mura(
    root: str,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    skip_bad: bool = False,
    check_images: bool = True,
) -> pd.DataFrame:
    """Read a MURA-v1.1 dataset into an image manifest (see the module docstring).

    Official valid becomes ``test``; official train is split by patient into ``train`` and
    ``val`` (``val_fraction`` of the patients, stratified, seeded). ``check_images`` finds the IEND
    chunk of every PNG to catch empty or truncated files (bytes after IEND are fine). Problems raise one
    ``DataError`` line, unless ``skip_bad`` leaves the offending images (and studies) out and
    records them in ``manifest.attrs["skipped"]``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = find_mura_root(root)
    fs, root_path = storage.get_fs(root)
    root_path = root_path.rstrip("/")
    sizes = _list_files(fs, root_path)  # one listing, not one exists() per file

    problems: list[tuple[str, str]] = []  # (path as written in the CSV, reason)
    images, studies = [], []
    study_rows: set[str] = set()  # problems that are rows of a labeled_studies CSV, not images
    for official in OFFICIAL_SPLITS:
        s, p = _read_studies(fs, root_path, official)
        studies.append(s)
        problems += p
        study_rows |= {path for path, _ in p}
        i, p = _read_images(fs, root_path, official)
        images.append(i)
        problems += p
    studies, images = pd.concat(studies, ignore_index=True), pd.concat(images, ignore_index=True)

    rejected = {_strip_first(path) for path, _ in problems}
    images, studies, p = _cross_check(
        images, studies, sizes, rejected=rejected, unreadable=_UnreadableFolders(fs, root_path, root)
    )
    problems += p
    if check_images:
        bad = _check_pngs(fs, root_path, images["rel"].tolist(), sizes)
        problems += [(images["csv_path"].iat[i], reason) for i, reason in bad]
        images = images.drop(index=images.index[[i for i, _ in bad]])
    images, studies, p = _drop_empty_studies(images, studies)
    problems += p
    study_rows |= {path for path, _ in p}

    if problems and not skip_bad:
        raise DataError(_problem_line(root, problems))
    if images.empty:
        raise DataError(
            f"no usable images in {root}" + (" after skipping bad ones" if problems else "")
        )
    _check_leakage(studies)

    manifest = _build_manifest(root, images, studies, val_fraction=val_fraction, seed=seed)
    listed = set(images["rel"]) | {_strip_first(path) for path, _ in problems}
    # Only PNGs count: CSVs, notes and .DS_Store files are not images a CSV could have listed.
    manifest.attrs["unlisted"] = sum(
        rel not in listed for rel in sizes if rel.lower().endswith(".png")
    )
    skipped = pd.DataFrame(problems, columns=["path", "reason"])
    skipped["entry"] = ["study" if p in study_rows else "image" for p in skipped["path"]]
    manifest.attrs["skipped"] = skipped
    return manifest


def _list_files(fs, root_path: str) -> dict[str, int]:
    """Relative path -> size for every file below the root, from a single recursive listing."""
    found = fs.find(root_path, detail=True)
    prefix = root_path + "/"
    out = {}
    for path, info in found.items():
        path = path if path.startswith(prefix) else fs._strip_protocol(path)
        if path.startswith(prefix):
            out[path[len(prefix) :]] = int(info.get("size") or 0)
    return out


def _read_csv(fs, root_path: str, name: str, columns: list[str]) -> pd.DataFrame:
    path = f"{root_path}/{name}"
    if not fs.exists(path):
        raise DataError(f"missing MURA CSV: {path}")
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {os_reason(e)}") from None
    try:
        return pd.read_csv(io.BytesIO(raw), header=None, names=columns, dtype=str,
                           keep_default_na=False, skip_blank_lines=True)  # fmt: skip
    except pd.errors.EmptyDataError:
        return pd.DataFrame({c: pd.Series(dtype=str) for c in columns})
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"cannot parse {path}: {e}") from e


def _strip_first(csv_path: str) -> str:
    """'MURA-v1.1/train/XR_X/...' -> 'train/XR_X/...'; the folder name itself is not trusted."""
    return csv_path.strip().strip("/").split("/", 1)[-1]


def _read_studies(fs, root_path: str, official: str) -> tuple[pd.DataFrame, list]:
    name = f"{official}_labeled_studies.csv"
    df = _read_csv(fs, root_path, name, ["csv_path", "label"])
    rows, problems = [], []
    for csv_path, label in zip(df["csv_path"], df["label"].str.strip()):
        rel = _strip_first(csv_path)
        m = _STUDY_RE.match(rel)
        reason = _bad_study_path(rel, m, official)
        if reason is None and label not in ("0", "1"):
            reason = f"label {label!r} in {name} is not 0 or 1"
        if reason is None and int(label) != (m["folder_label"] == "positive"):
            reason = f"label {label} in {name} disagrees with folder name"
        if reason is not None:
            problems.append((csv_path, reason))
            continue
        study_id = f"{m['official']}/XR_{m['part']}/{m['patient']}/{m['study']}"
        rows.append((csv_path, rel, study_id, official, m["part"], m["patient"], int(label)))
    cols = ["csv_path", "rel", "study_id", "official_split", "body_part", "patient_id", "label"]
    studies = pd.DataFrame(rows, columns=cols)
    dup = studies["study_id"].duplicated(keep=False)
    if dup.any():  # listed twice, or as both studyK_positive and studyK_negative
        problems += [(p, "study listed more than once") for p in studies.loc[dup, "csv_path"]]
        studies = studies[~dup]
    return studies, problems


def _bad_study_path(rel: str, m, official: str) -> str | None:
    if m is None:
        return "not a MURA study path (split/XR_PART/patientN/studyK_positive|negative/)"
    if m["official"] != official:
        return f"path is not under {official}/"
    if m["part"] not in BODY_PARTS:
        return f"unknown body part XR_{m['part']}"
    return None


def _read_images(fs, root_path: str, official: str) -> tuple[pd.DataFrame, list]:
    df = _read_csv(fs, root_path, f"{official}_image_paths.csv", ["csv_path"])
    rows, problems = [], []
    for csv_path in df["csv_path"]:
        rel = _strip_first(csv_path)
        m = _IMAGE_RE.match(rel)
        sm = _STUDY_RE.match(m["study_dir"]) if m else None
        reason = "not a MURA image path (…/studyK_label/imageJ.png)" if m is None else None
        reason = reason or _bad_study_path(m["study_dir"], sm, official)
        if reason is not None:
            problems.append((csv_path, reason))
            continue
        rows.append((csv_path, rel, m["study_dir"], int(m["view"])))
    images = pd.DataFrame(rows, columns=["csv_path", "rel", "study_rel", "view"])
    dup = images["rel"].duplicated()
    if dup.any():
        problems += [(p, "image listed more than once") for p in images.loc[dup, "csv_path"]]
        images = images[~dup]
    return images, problems


def _cross_check(
    images, studies, sizes: dict[str, int], *, rejected: set[str], unreadable: _UnreadableFolders
):
    """Images must exist and belong to a labeled study (``rejected``: studies already reported).

    An image is missing from the one recursive listing either because it is not there or because
    a folder above it could not be listed (the listing skips those silently); ``unreadable``
    tells the two apart, so such images are reported once per folder, with its reason.
    """
    problems = []
    missing = ~images["rel"].isin(sizes.keys())
    listed_dirs = {rel.rsplit("/", 1)[0] for rel in sizes}
    for path, study_rel in zip(images.loc[missing, "csv_path"], images.loc[missing, "study_rel"]):
        # A folder with any file listed was readable: only the image itself is missing.
        reason = None if study_rel in listed_dirs else unreadable.reason(study_rel)
        problems.append((path, reason or "image listed but missing"))
    images = images[~missing]
    orphan = ~images["study_rel"].isin(set(studies["rel"]))
    for path, study_rel in zip(images.loc[orphan, "csv_path"], images.loc[orphan, "study_rel"]):
        # A study rejected above (e.g. label vs folder) takes its images with it.
        reason = "its study was left out" if study_rel in rejected else "study not in labeled CSV"
        problems.append((path, reason))
    images = images[~orphan].reset_index(drop=True)
    return images, studies, problems


class _UnreadableFolders:
    """Which folders below the root cannot be listed, probed top down and remembered."""

    _ABSENT = "absent"  # probed: no such folder (its images are just missing)

    def __init__(self, fs, root_path: str, root: str) -> None:
        self.fs, self.root_path, self.root = fs, root_path, root
        self._seen: dict[str, str | None] = {}  # relative folder -> why it cannot be listed

    def reason(self, rel_dir: str) -> str | None:
        """'cannot read folder <dir> (<reason>)' for the highest unreadable folder from the root
        down to ``rel_dir``; None when every existing one can be listed."""
        parts = rel_dir.split("/")
        for depth in range(len(parts) + 1):
            rel = "/".join(parts[:depth])
            if rel not in self._seen:
                self._seen[rel] = self._probe(rel)
            if self._seen[rel] == self._ABSENT:
                return None
            if self._seen[rel] is not None:
                shown = f"{self.root}/{rel}" if rel else self.root
                return f"cannot read folder {shown} ({self._seen[rel]})"
        return None

    def _probe(self, rel: str) -> str | None:
        try:
            self.fs.ls(f"{self.root_path}/{rel}" if rel else self.root_path, detail=False)
        except FileNotFoundError:
            return self._ABSENT
        except OSError as e:
            return os_reason(e)
        return None


def _drop_empty_studies(images: pd.DataFrame, studies: pd.DataFrame):
    empty = ~studies["rel"].isin(set(images["study_rel"]))
    problems = [(p, "study has no usable images") for p in studies.loc[empty, "csv_path"]]
    return images.reset_index(drop=True), studies[~empty].reset_index(drop=True), problems


def _check_pngs(
    fs, root_path: str, rels: list[str], sizes: dict[str, int]
) -> list[tuple[int, str]]:
    """(row index, reason) for files that are not complete PNGs, judged by finding the IEND
    chunk (:mod:`raysearch.data.integrity`): head and tail bytes, the whole file only when the
    tail is not IEND (padding after it is fine, as it is for the decoder)."""

    def check(i: int) -> tuple[int, str] | None:
        path = f"{root_path}/{rels[i]}"
        try:
            reason = image_problem(lambda a, b: fs.cat_file(path, start=a, end=b),
                                   sizes[rels[i]], expect="PNG")  # fmt: skip
        except OSError as e:
            return i, f"cannot read image: {e}"
        return None if reason is None else (i, reason)

    with ThreadPoolExecutor(max_workers=16) as pool:
        return [r for r in pool.map(check, range(len(rels)), chunksize=64) if r is not None]


def _problem_line(root: str, problems: list[tuple[str, str]]) -> str:
    by_reason: dict[str, list[str]] = defaultdict(list)
    for path, reason in problems:
        by_reason[reason].append(path)
    parts = [f"{reason} ({len(paths)}): {name_some(paths)}" for reason, paths in by_reason.items()]
    n = len(problems)
    return (
        f"{n} problem{'s' if n != 1 else ''} in the MURA data at {root} — {'; '.join(parts)}. "
        "Fix them, or leave them out: data.skip_bad: true in the space or trial file "
        "(raysearch data --skip-bad)."
    )


def _check_leakage(studies: pd.DataFrame) -> None:
    patients = studies.groupby("official_split")["patient_id"].agg(set)
    both = sorted(patients.get("train", set()) & patients.get("valid", set()))
    if both:
        raise DataError(
            f"{len(both)} patients appear in both official train and valid (test leakage): "
            f"{name_some(both)}"
        )


def _build_manifest(root, images, studies, *, val_fraction: float, seed: int) -> pd.DataFrame:
    df = images.merge(studies.drop(columns="csv_path"), left_on="study_rel", right_on="rel",
                      suffixes=("", "_study"), validate="many_to_one")  # fmt: skip
    assignment = split_patients(studies[studies["official_split"] == "train"],
                                val_fraction=val_fraction, seed=seed)  # fmt: skip
    df["split"] = np.where(
        df["official_split"] == "valid", "test", df["patient_id"].map(assignment).fillna("train")
    )
    df["image_path"] = [storage.join(root, rel) for rel in df["rel"]]
    df["view"] = df["view"].astype("int64")
    df["label"] = df["label"].astype("int64")
    df = df.sort_values(["official_split", "study_id", "view"], kind="stable")
    return df[MANIFEST_COLUMNS].reset_index(drop=True)


def skipped_frame(manifest: pd.DataFrame) -> pd.DataFrame:
    """What ``read_mura(skip_bad=True)`` left out, as a DataFrame with columns path, reason,
    entry ("image" or "study": which CSV's row it is)."""
    skipped = manifest.attrs.get("skipped")
    if skipped is None:
        return pd.DataFrame(columns=["path", "reason", "entry"])
    out = pd.DataFrame(skipped)
    if "entry" not in out:  # a frame from before the entry column: paths tell images apart
        out["entry"] = ["image" if str(p).lower().endswith(".png") else "study" for p in out["path"]]
    return out[["path", "reason", "entry"]]


def skipped_counts(manifest: pd.DataFrame) -> str:
    """What ``skip_bad`` left out, in words: "3 images and 1 study", "" when nothing.

    Images and studies are counted apart: a left-out study is one row of a labeled_studies
    CSV, not an image (its images, if any, are counted as images).
    """
    entries = skipped_frame(manifest)["entry"]
    parts = []
    for entry, plural in (("image", "images"), ("study", "studies")):
        n = int((entries == entry).sum())
        if n:
            parts.append(f"{n} {entry if n == 1 else plural}")
    return " and ".join(parts)


# ---------------------------------------------------------------------------------------------
# Patient split


# ---------------------------------------------------------------------------------------------
# Summaries


def summarize(manifest: pd.DataFrame) -> pd.DataFrame:
    """Counts per split x body part, with an ALL row per split and an "all" grand total.

    Columns: split, body_part, patients, studies, images, normal_studies, abnormal_studies,
    abnormal_fraction (of studies).
    """

    def counts(df: pd.DataFrame) -> dict:
        study_labels = df.drop_duplicates("study_id")["label"]
        n = len(study_labels)
        return {
            "patients": df["patient_id"].nunique(),
            "studies": n,
            "images": len(df),
            "normal_studies": int((study_labels == 0).sum()),
            "abnormal_studies": int((study_labels == 1).sum()),
            "abnormal_fraction": float(study_labels.mean()) if n else float("nan"),
        }

    rows = []
    splits = [s for s in SPLITS if s in set(manifest["split"])]
    for split in splits:
        part_df = manifest[manifest["split"] == split]
        for part in BODY_PARTS:
            sub = part_df[part_df["body_part"] == part]
            if len(sub):
                rows.append({"split": split, "body_part": part, **counts(sub)})
        rows.append({"split": split, "body_part": "ALL", **counts(part_df)})
    rows.append({"split": "all", "body_part": "ALL", **counts(manifest)})
    return pd.DataFrame(rows)


def summary_table(manifest: pd.DataFrame, *, title: str = "MURA manifest") -> Table:
    """A Rich table of ``summarize(manifest)``, with a caption for unlisted and skipped files."""
    summary = summarize(manifest)
    table = Table(title=title)
    table.add_column("split")
    table.add_column("body part")
    for name in ("patients", "studies", "images", "normal", "abnormal", "abnormal %"):
        table.add_column(name, justify="right")
    for row in summary.itertuples(index=False):
        total = row.body_part == "ALL"
        table.add_row(
            row.split if total or row.split == "all" else "",
            row.body_part,
            f"{row.patients:,}", f"{row.studies:,}", f"{row.images:,}",
            f"{row.normal_studies:,}", f"{row.abnormal_studies:,}",
            f"{100 * row.abnormal_fraction:.1f}",
            style="bold" if total else None,
            end_section=total,
        )  # fmt: skip
    notes = []
    if counts := skipped_counts(manifest):
        notes.append(f"left out {counts}")
    if manifest.attrs.get("unlisted"):
        notes.append(f"{manifest.attrs['unlisted']} PNG files on disk are in no CSV")
    if notes:
        table.caption = "; ".join(notes)
    return table
