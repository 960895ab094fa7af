"""Inference stage, ``raysearch predict``: a trained ensemble on new studies.

Inputs (:func:`collect_images`), each a local path or an fsspec URL:

- image files (PNG, JPEG, DICOM: ``.dcm`` or any file with the ``DICM`` magic);
- a folder of studies, at any depth: a study is a folder that holds images (so a MURA- or
  CheXpert-layout tree works as it is, ``patientNNNNN`` folders giving the patient);
- a CSV listing ``image_path`` (relative to the CSV, or absolute, or a URL) and ``study_id``
  (optional: one study per image), optionally ``patient_id``.

Outputs, written atomically under ``--out`` (:func:`run_predict`):

- ``predictions.parquet``: one row per image: ``image_path``, ``study_id``, ``patient_id``, the
  DICOM hints (``body_part_hint``, ``view_hint``, ``laterality_hint``, ``study_uid_hint``; a
  folder whose DICOM images name several Study Instance UIDs becomes one study per UID), the
  ensemble probability
  (``prob``; ``prob_<label>`` for several labels) and one ``prob_<trial_id>`` per member;
- ``studies.parquet``: one row per study, aggregated by the task's rule, with ``pred`` at the
  ensemble's threshold;
- ``worklist.csv``: studies from most to least likely positive;
- ``skipped.csv``: every input that could not be used, and why (nothing is dropped silently).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raysearch.errors import ConfigError, DataError, name_some, os_reason
from raysearch.storage import atomic_write_parquet, atomic_write_text, get_fs, is_url, join

__all__ = ["IMAGE_EXTENSIONS", "collect_images", "run_predict"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
_PATIENT = re.compile(r"(?:^|/)(patient\d+)(?:/|$)")


@dataclass
class Collected:
    """What the inputs hold: ``images`` (image_path, study_id, patient_id) and ``skipped``
    (path, reason)."""

    images: pd.DataFrame
    skipped: list[tuple[str, str]]


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _uri(fs, path: str, like: str) -> str:
    """A path from ``fs`` as a URI of the same kind as ``like`` (a local path or a URL)."""
    if not is_url(like):
        return path
    protocol = like.split("://", 1)[0]
    return f"{protocol}://{path.lstrip('/')}"


def _patient(study: str) -> str:
    m = _PATIENT.search(study)
    return m.group(1) if m else study


def _name_studies(images: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(image, study id, patient id) for images whose study is their folder. The study id is the
    folder's path below the deepest folder that holds every study's parent, so two studies never
    share an id (``p1/study1`` and ``p2/study1``, not ``study1`` twice) and a lone study keeps
    its own name."""
    if not images:
        return []
    parents = {folder.rsplit("/", 1)[0] for _, folder in images}
    parts = [p.split("/") for p in parents]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    base = "/".join(common)
    out = []
    for uri, folder in images:
        study = folder[len(base):].strip("/") if base else folder
        # The patient folder may lie above the common base (one study or one patient given):
        # look for it in the whole path, not only in the study id.
        m = _PATIENT.search(folder)
        out.append((uri, study, m.group(1) if m else study))
    return out


def collect_images(inputs: Sequence[str]) -> Collected:
    """Every image the inputs name, with its study and patient. Raises :class:`DataError` for an
    input that does not exist or cannot be read (an unreachable host: the input named, with the
    reason) and when nothing usable is found (an empty folder)."""
    rows: list[tuple[str, str, str]] = []
    by_folder: list[tuple[str, str]] = []  # (image, its study folder) from folders and files
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        try:
            _collect_one(item, rows, by_folder)
        except OSError as e:  # an unreachable host, a refused connection, no permission
            raise DataError(f"cannot read input {item}: {os_reason(e)}") from None
    rows += _name_studies(by_folder)
    frame = pd.DataFrame(rows, columns=["image_path", "study_id", "patient_id"])
    dup = frame["image_path"].duplicated()
    skipped += [(p, "listed more than once") for p in frame.loc[dup, "image_path"]]
    frame = frame[~dup].reset_index(drop=True)
    if frame.empty:
        raise DataError(f"no images found in {name_some(list(inputs))}")
    return Collected(frame, skipped)


def _collect_one(item: str, rows: list[tuple[str, str, str]],
                 by_folder: list[tuple[str, str]]) -> None:
    """Add the images of one input (a file, a folder, a CSV; local or a URL) to ``rows`` (CSV
    rows: image, study, patient) or ``by_folder`` (image, its study folder). Raises
    :class:`DataError` for a missing input or a folder without images; OS errors (an
    unreachable host) pass through for :func:`collect_images` to name the input."""
    fs, path = get_fs(item)
    path = path.rstrip("/")
    if not fs.exists(path):
        raise DataError(f"input not found: {item}")
    if fs.isdir(path):
        found = [p for p in fs.find(path, withdirs=False)]
        images = [p for p in found if _is_image(p)]
        # A file without an image extension may still be DICOM (PACS exports often have none).
        for p in found:
            if not _is_image(p) and "." not in p.rsplit("/", 1)[-1]:
                images.append(p)
        if not images:
            raise DataError(f"no images in {item} (looked for {', '.join(IMAGE_EXTENSIONS)} "
                            "and extension-less DICOM files)")
        for p in sorted(images):  # a study is the folder that holds the image
            uri = _uri(fs, p, item)
            by_folder.append((uri, uri.rsplit("/", 1)[0]))
    elif path.lower().endswith(".csv"):
        rows.extend(_from_csv(item, fs, path))
    else:
        uri = _uri(fs, path, item)
        by_folder.append((uri, uri.rsplit("/", 1)[0]))


def _from_csv(item: str, fs, path: str) -> list[tuple[str, str, str]]:
    with fs.open(path, "rb") as f:
        try:
            table = pd.read_csv(io.BytesIO(f.read()), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
            raise DataError(f"cannot parse {item}: {e}") from None
    column = next((c for c in ("image_path", "path", "Path") if c in table.columns), None)
    if column is None:
        raise DataError(f"{item} has no image_path column (columns: {', '.join(table.columns)})")
    base = item.rsplit("/", 1)[0] if is_url(item) else os.path.dirname(os.path.abspath(item))
    rows = []
    for i, rec in table.iterrows():
        p = rec[column].strip()
        if not p:
            raise DataError(f"{item}: row {i + 2} has an empty {column}")
        uri = p if (is_url(p) or os.path.isabs(p)) else join(base, p)
        study = rec.get("study_id") or uri
        rows.append((uri, study, rec.get("patient_id") or _patient(study)))
    return rows


def run_predict(
    inputs: Sequence[str],
    *,
    ensemble: str | None = None,
    storage: str = "reports",
    out: str = "predictions",
    tta: bool = False,
    batch_size: int = 64,
    console=None,
) -> str:
    """``raysearch predict``: run the ensemble (``ensemble``: an ensemble or experiment folder,
    default the most recent experiment under ``storage``) on the images the inputs name, and
    write the outputs (see the module docstring) atomically under ``out``. Returns ``out``.

    Images that cannot be read or decoded are skipped, each with its reason, and listed in the
    summary and ``skipped.csv``; if none can be used it is a :class:`DataError`.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from raysearch.data.images import preprocess_image_sizes
    from raysearch.experiment import check_model_folder, find_experiment

    console = console or Console(stderr=True)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    # The cheap checks first (the folder, the inputs), then torch and the members.
    source = check_model_folder(ensemble or find_experiment(None, storage=storage))
    collected = collect_images(inputs)
    from raysearch.inference.predictor import Predictor

    predictor = Predictor.from_dir(source, batch_size=batch_size)
    task = predictor.task
    images, skipped = collected.images, list(collected.skipped)

    # --- decode every image once per member image size; a bad one is skipped with its reason
    # (threads: reading and PIL's decoders release the GIL; results are taken in input order)
    sizes = sorted({m.config.image_size for m in predictor.members})
    arrays = {s: [] for s in sizes}
    hints, keep = [], []

    def read_one(path: str):
        try:
            raw = _read(path)
            return _hints(raw), preprocess_image_sizes(raw, image_sizes=sizes), None
        except DataError as e:  # the decoder saw bytes: name the file
            return None, None, str(e).replace("<bytes>", path)

    # A bar only on a terminal: elsewhere (a pipe, a log) rich leaves an empty line behind.
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=console, disable=not console.is_terminal) as bar, \
            ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        job = bar.add_task("reading images", total=len(images))
        for i, (path, (hint, decoded, error)) in enumerate(
                zip(images["image_path"], pool.map(read_one, images["image_path"]))):
            if error is not None:
                skipped.append((path, error))
            else:
                keep.append(i)
                hints.append(hint)
                for s in sizes:
                    arrays[s].append(decoded[s])
            bar.advance(job)
    if not keep:
        raise DataError(f"none of the {len(images)} images could be used: "
                        f"{name_some([f'{p} ({r})' for p, r in skipped])}")
    images = images.iloc[keep].reset_index(drop=True)
    images = pd.concat([images, pd.DataFrame(hints)], axis=1)
    images, split = _split_by_study_uid(images)
    if split:
        console.print(f"[yellow]{split} folder(s) held images of more than one DICOM study "
                      "(Study Instance UID): each study is scored on its own[/]")
    stacked = {s: np.stack(v) for s, v in arrays.items()}

    # --- the members, then the ensemble, image by image, then studies by the task's rule
    pred = predictor.predict_preprocessed(stacked, tta=tta)
    prob_cols = list(task.prob_columns)
    for j, col in enumerate(prob_cols):
        images[col] = pred.probs[:, j]
    for tid, p in pred.members.items():
        for j, col in enumerate(prob_cols):
            images[f"{col}_{tid}" if task.k > 1 else f"prob_{tid}"] = p[:, j]
    grouped = images.groupby("study_id", sort=True)
    studies = grouped[["patient_id"]].first()
    studies["n_images"] = grouped.size()
    for col in [c for c in images.columns if c.startswith("prob")]:
        studies[col] = getattr(grouped[col], task.aggregation)()
    for hint in ("body_part_hint", "view_hint", "laterality_hint"):
        studies[hint] = grouped[hint].agg(
            lambda v: "+".join(sorted({str(x) for x in v.dropna() if x})) or None)
    studies = studies.reset_index()
    # A study is flagged when any label's probability passes that label's threshold (the
    # ensemble's, chosen on val); the worklist ranks by the margin over it.
    margin = studies[prob_cols].to_numpy() - predictor.thresholds[None, :]
    score = pd.Series(margin.max(axis=1), index=studies.index)
    studies.insert(studies.columns.get_loc(prob_cols[-1]) + 1, "pred",
                   (score > 0).astype(np.int64))
    work = studies.assign(score=score).sort_values(["score", "study_id"], ascending=[False, True],
                                                   kind="stable")
    work = work[["study_id", "patient_id", "n_images", *prob_cols, "pred"]].reset_index(drop=True)
    work.insert(0, "rank", np.arange(1, len(work) + 1))

    # --- write, each file atomically
    atomic_write_parquet(images, join(out, "predictions.parquet"))
    atomic_write_parquet(studies, join(out, "studies.parquet"))
    atomic_write_text(join(out, "worklist.csv"), work.to_csv(index=False))
    atomic_write_text(join(out, "skipped.csv"),
                      pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(index=False))
    flagged = int(studies["pred"].sum())
    console.print(
        f"{len(studies)} studies ({len(images)} images) -> {out}: {flagged} flagged "
        f"{'positive' if task.k > 1 else task.labels[0]} at "
        + (f"threshold {predictor.threshold:.3g}" if task.k == 1 else "the per-label thresholds")
        + (f"; skipped {len(skipped)} input(s)" if skipped else "")
    )
    for _, reason in skipped[:10]:
        console.print(f"[yellow]  skipped: {reason}[/]")
    if len(skipped) > 10:
        console.print(f"[yellow]  ... and {len(skipped) - 10} more in skipped.csv[/]")
    return out


def _read(path: str) -> bytes:
    from raysearch.storage import read_bytes

    try:
        return read_bytes(path)
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _hints(raw: bytes) -> dict[str, str | None]:
    from raysearch.data.dicom import dicom_hints, is_dicom

    hints = dicom_hints(raw) if is_dicom(raw) else {}
    return {f"{k}_hint": hints.get(k) for k in ("body_part", "view", "laterality", "study_uid")}


def _split_by_study_uid(images: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Studies taken from folders, split where their DICOM images name different studies
    (``study_uid_hint``): ``<folder>/<Study Instance UID>`` each, so that two studies put in one
    folder are never aggregated into one answer. Returns the frame and how many folders split."""
    uids = images["study_uid_hint"]
    mixed = uids.notna() & images.groupby("study_id")["study_uid_hint"].transform(
        lambda v: v.dropna().nunique() > 1)
    if not mixed.any():
        return images, 0
    images = images.copy()
    images.loc[mixed, "study_id"] = images.loc[mixed, "study_id"] + "/" + uids[mixed]
    return images, int(images.loc[mixed, "study_id"].str.rsplit("/", n=1).str[0].nunique())
