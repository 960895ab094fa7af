"""Data stage, demo input: synthetic chest radiographs in exactly the CheXpert-v1.0-small or the
ChestX-ray14 layout, for ``raysearch demo-data --format chexpert|nih``.

CheXpert (:func:`make_chexpert_demo`): ``CheXpert-v1.0-small/{train,valid}.csv`` with CheXpert's
header, images ``{train,valid}/patientNNNNN/studyN/viewN_{frontal,lateral}.jpg``. ChestX-ray14
(:func:`make_nih_demo`): ``Data_Entry_2017_v2020.csv`` with its bracketed header names,
``images_001/images/*.png`` ..., ``train_val_list.txt`` and ``test_list.txt``.

The pictures: a body outline, two dark lung fields, a heart, ribs, and noise. Each study draws
two latent conditions per patient, "congestion" and "infection", so its findings are correlated
as in real chests: congestion drives an enlarged heart (Cardiomegaly, Enlarged
Cardiomediastinum), Edema (haze over both lungs) and Pleural Effusion (a bright base); infection
drives Consolidation and Pneumonia (a dense patch) and Atelectasis (a band). Lung Opacity is
positive when any parenchymal finding is, as CheXpert's label hierarchy has it. Pneumothorax (a
dark rim without lung markings), Support Devices (bright tubes and wires), Lung Lesion (a
nodule), Fracture (a rib step) and Pleural Other (a pleural line) are drawn on their own; the
last three are small and hard, the others are visible at 64 px and learnable.

Labels as the CheXpert labeller writes them: a present finding is 1.0, or -1.0 (uncertain) for
a fifth of them; an absent one is mostly blank (not mentioned), sometimes 0.0, sometimes -1.0;
No Finding is 1.0 or blank. ``valid.csv`` carries the truth, 0/1 only, as the radiologists'
consensus does. ChestX-ray14's labels are the truth under the NIH names (Effusion, no Lung
Opacity, ...). Output is a pure function of the seed.
"""

from __future__ import annotations

import io
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from raysearch import storage
from raysearch.data.chexpert import CHEXPERT_LABELS
from raysearch.data.synth import start_demo_folder
from raysearch.errors import ConfigError

__all__ = ["CHEST_SIZES", "make_chexpert_demo", "make_nih_demo"]


@dataclass(frozen=True)
class ChestSize:
    train_patients: int
    valid_patients: int
    side: int  # image height in pixels (width 0.85-1.0 of it for frontal views)


CHEST_SIZES = {
    "tiny": ChestSize(train_patients=60, valid_patients=15, side=128),
    "small": ChestSize(train_patients=500, valid_patients=100, side=192),
    "medium": ChestSize(train_patients=2500, valid_patients=200, side=256),
    "large": ChestSize(train_patients=10000, valid_patients=200, side=320),
}
# CheXpert names -> ChestX-ray14 names, for the findings both have (the NIH set adds none here).
NIH_NAMES = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly",
             "Consolidation": "Consolidation", "Edema": "Edema", "Pleural Effusion": "Effusion",
             "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Lung Lesion": "Nodule"}
PARENCHYMAL = ("Edema", "Consolidation", "Pneumonia", "Atelectasis", "Lung Lesion")


@dataclass(frozen=True)
class _Job:
    rel_path: str
    seed: int
    findings: tuple[str, ...]
    lateral: bool
    side: int
    fmt: str  # "JPEG" or "PNG"


# ---------------------------------------------------------------------------------------------
# Findings of a study, from two latent conditions of its patient


def _latent(rng: np.random.Generator) -> float:
    """A patient's condition: about a third have it (0.7-1), the rest barely (0-0.05)."""
    return float(rng.uniform(0.7, 1.0) if rng.random() < 0.35 else rng.uniform(0.0, 0.05))


def _findings(rng: np.random.Generator, congestion: float, infection: float) -> set[str]:
    p = {
        "Cardiomegaly": 0.03 + 0.75 * congestion,
        "Enlarged Cardiomediastinum": 0.02 + 0.45 * congestion,
        "Edema": 0.02 + 0.7 * congestion,
        "Pleural Effusion": 0.04 + 0.65 * congestion + 0.1 * infection,
        "Consolidation": 0.02 + 0.7 * infection,
        "Pneumonia": 0.01 + 0.5 * infection,
        "Atelectasis": 0.04 + 0.45 * infection,
        "Pneumothorax": 0.07,
        "Support Devices": 0.15 + 0.35 * max(congestion, infection),
        "Lung Lesion": 0.05,
        "Fracture": 0.04,
        "Pleural Other": 0.03,
    }
    found = {name for name, q in p.items() if rng.random() < q}
    if found & set(PARENCHYMAL):
        found.add("Lung Opacity")
    return found


def _raw_labels(rng: np.random.Generator, found: set[str], *, certain: bool) -> dict[str, str]:
    """CheXpert's cells for one study: '1.0', '0.0', '-1.0' or '' (see the module docstring)."""
    out = {}
    for name in CHEXPERT_LABELS:
        if name == "No Finding":
            none = not (found - {"Support Devices"})
            out[name] = ("1.0" if none else "0.0") if certain else ("1.0" if none else "")
            continue
        present = name in found
        if certain:
            out[name] = "1.0" if present else "0.0"
        elif present:
            out[name] = "-1.0" if rng.random() < 0.2 else "1.0"
        else:
            u = rng.random()
            out[name] = "" if u < 0.8 else "0.0" if u < 0.95 else "-1.0"
    return out


# ---------------------------------------------------------------------------------------------
# Rendering


def _render(job: _Job) -> bytes:
    rng = np.random.default_rng(job.seed)
    h = job.side
    w = h if job.lateral else int(h * rng.uniform(0.85, 1.0))
    f = set(job.findings)
    img = Image.new("L", (w, h), int(rng.uniform(5, 25)))
    d = ImageDraw.Draw(img)
    cx, cy = w / 2 + rng.normal(0, 0.02 * w), h * 0.52 + rng.normal(0, 0.02 * h)
    body = int(rng.uniform(95, 125))
    d.ellipse([cx - 0.46 * w, cy - 0.5 * h, cx + 0.46 * w, cy + 0.52 * h], fill=body)
    lung = int(rng.uniform(35, 55))
    if job.lateral:
        lungs = [(cx - 0.3 * w, cy - 0.36 * h, cx + 0.28 * w, cy + 0.3 * h)]
    else:
        lungs = [(cx - 0.38 * w, cy - 0.38 * h, cx - 0.05 * w, cy + 0.3 * h),
                 (cx + 0.05 * w, cy - 0.38 * h, cx + 0.38 * w, cy + 0.3 * h)]
    for box in lungs:
        d.ellipse(box, fill=lung)
    # ribs: faint arcs over the lungs
    for k in range(7):
        y = cy - 0.32 * h + k * 0.09 * h
        d.arc([cx - 0.42 * w, y - 0.06 * h, cx + 0.42 * w, y + 0.1 * h], 200, 340,
              fill=lung + 25, width=max(1, h // 90))
    # heart (and mediastinum): its width is the cardiothoracic ratio
    ratio = rng.uniform(0.30, 0.42) if "Cardiomegaly" not in f else rng.uniform(0.58, 0.7)
    hw = ratio * 0.76 * w / 2
    heart = [cx - 0.35 * hw, cy - 0.02 * h, cx + 1.1 * hw, cy + 0.3 * h]
    if job.lateral:
        heart = [cx - 0.1 * w, cy + 0.0 * h, cx + 0.1 * w + hw * 0.6, cy + 0.28 * h]
    d.ellipse(heart, fill=int(rng.uniform(150, 175)))
    med = 0.07 * w if "Enlarged Cardiomediastinum" not in f else 0.13 * w
    if not job.lateral:
        d.rectangle([cx - med / 2, cy - 0.45 * h, cx + med / 2, cy], fill=int(rng.uniform(140, 165)))
    # findings
    left, right = lungs[0], lungs[-1]
    if "Pleural Effusion" in f:
        for box in (lungs if rng.random() < 0.5 else [lungs[int(rng.integers(len(lungs)))]]):
            top = box[3] - (box[3] - box[1]) * rng.uniform(0.25, 0.4)
            d.chord([box[0], top - 0.05 * h, box[2], box[3] + 0.02 * h], 0, 180, fill=150)
            d.rectangle([box[0] + 0.02 * w, top, box[2] - 0.02 * w, box[3] - 0.02 * h], fill=145)
    if "Consolidation" in f or "Pneumonia" in f:
        box = lungs[int(rng.integers(len(lungs)))]
        px, py = rng.uniform(box[0] + 0.05 * w, box[2] - 0.05 * w), rng.uniform(
            box[1] + 0.15 * h, box[3] - 0.12 * h)
        r = 0.09 * w if "Consolidation" in f else 0.07 * w
        d.ellipse([px - r, py - 0.8 * r, px + r, py + 0.8 * r], fill=int(rng.uniform(135, 155)))
    if "Atelectasis" in f:
        box = lungs[int(rng.integers(len(lungs)))]
        y = rng.uniform(box[1] + 0.45 * (box[3] - box[1]), box[3] - 0.1 * h)
        d.line([box[0] + 0.03 * w, y, box[2] - 0.03 * w, y + rng.normal(0, 0.02 * h)],
               fill=135, width=max(2, h // 30))
    if "Pneumothorax" in f:
        box = left if rng.random() < 0.5 else right
        d.chord([box[0], box[1], box[2], box[1] + 0.5 * (box[3] - box[1])], 180, 360, fill=8)
        d.arc([box[0] + 0.03 * w, box[1] + 0.03 * h, box[2] - 0.03 * w, box[3]], 190, 350,
              fill=90, width=1)
    if "Lung Lesion" in f:
        box = lungs[int(rng.integers(len(lungs)))]
        px, py = (box[0] + box[2]) / 2 + rng.normal(0, 0.04 * w), (box[1] + box[3]) / 2
        r = 0.025 * w
        d.ellipse([px - r, py - r, px + r, py + r], fill=150)
    if "Pleural Other" in f:
        box = lungs[0]
        d.arc(box, 120, 240, fill=150, width=max(1, h // 100))
    if "Fracture" in f:
        y = cy - 0.2 * h + rng.uniform(0, 0.3 * h)
        x = rng.choice([cx - 0.35 * w, cx + 0.3 * w])
        d.line([x, y, x + 0.03 * w, y + 0.015 * h], fill=0, width=max(1, h // 120))
    img = img.filter(ImageFilter.GaussianBlur(0.006 * h))
    if "Edema" in f:  # a perihilar haze over both lungs
        haze = Image.new("L", (w, h), 0)
        hd = ImageDraw.Draw(haze)
        for box in lungs:
            hd.ellipse(box, fill=int(rng.uniform(45, 65)))
        haze = haze.filter(ImageFilter.GaussianBlur(0.03 * h))
        img = Image.fromarray(np.clip(np.asarray(img, np.int16) + np.asarray(haze, np.int16),
                                      0, 255).astype(np.uint8))
    if "Support Devices" in f:  # drawn sharp: tubes and wires
        d = ImageDraw.Draw(img)
        d.line([cx + rng.normal(0, 0.02 * w), 0, cx + rng.normal(0, 0.02 * w), cy + 0.05 * h],
               fill=250, width=max(2, h // 50))
        for _ in range(int(rng.integers(1, 3))):
            pts = [(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(3)]
            d.line(pts, fill=245, width=max(1, h // 90))
    pixels = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(2, 5), (h, w))
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    if job.fmt == "JPEG":
        out.save(buf, format="JPEG", quality=90)
    else:
        out.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _render_chunk(jobs: list[_Job]) -> list[bytes]:
    return [_render(job) for job in jobs]


# ---------------------------------------------------------------------------------------------
# Writing


def _write_images(root: str, jobs: list[_Job], num_workers: int | None) -> None:
    fs, root_path = storage.get_fs(root)
    workers = num_workers or min(os.cpu_count() or 1, 4)
    chunks = [jobs[i:i + 64] for i in range(0, len(jobs), 64)]
    made: set[str] = set()

    def write(job: _Job, data: bytes) -> None:
        path = f"{root_path}/{job.rel_path}"
        parent = path.rsplit("/", 1)[0]
        if parent not in made:
            fs.makedirs(parent, exist_ok=True)
            made.add(parent)
        fs.pipe_file(path, data)

    if workers > 1 and len(chunks) > 1:
        # spawn, not fork: the caller may hold Ray or torch threads that do not survive a fork.
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=get_context("spawn")) as ex:
            for batch, images in zip(chunks, ex.map(_render_chunk, chunks)):
                for job, data in zip(batch, images):
                    write(job, data)
    else:
        for batch in chunks:
            for job, data in zip(batch, _render_chunk(batch)):
                write(job, data)


def _check(size: str, num_workers: int | None) -> ChestSize:
    if size not in CHEST_SIZES:
        raise ConfigError(f"unknown demo size {size!r}; choose one of {', '.join(CHEST_SIZES)}")
    if num_workers is not None and num_workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
    return CHEST_SIZES[size]


def _image_seed(seed: int, rel: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(rel.encode())) % 2**63


def make_chexpert_demo(out_dir: str, *, seed: int = 0, size: str = "small",
                       num_workers: int | None = None, overwrite: bool = False) -> str:
    """Write a synthetic CheXpert-v1.0-small below ``out_dir``; returns its folder. Same seed
    and size, same bytes. An existing folder is replaced only with ``overwrite`` and only when
    demo-data made it."""
    spec = _check(size, num_workers)
    root = start_demo_folder(out_dir, "CheXpert-v1.0-small", overwrite=overwrite,
                  meta={"format": "chexpert", "seed": seed, "size": size})
    rng = np.random.default_rng(seed)
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_LABELS) + "\n"
    lines = {"train": [header], "valid": [header]}
    jobs = []
    patients = [("train", i + 1) for i in range(spec.train_patients)]
    patients += [("valid", spec.train_patients + i + 1) for i in range(spec.valid_patients)]
    for split, number in patients:
        congestion, infection = _latent(rng), _latent(rng)
        sex, age = str(rng.choice(["Female", "Male"])), int(rng.integers(18, 90))
        n_studies = 1 if split == "valid" else int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
        for k in range(n_studies):
            found = _findings(rng, congestion, infection)
            cells = _raw_labels(rng, found, certain=split == "valid")
            views = ["frontal"] + (["lateral"] if rng.random() < 0.3 else [])
            ap = str(rng.choice(["AP", "PA"], p=[0.7, 0.3]))
            for j, view in enumerate(views):
                rel = f"{split}/patient{number:05d}/study{k + 1}/view{j + 1}_{view}.jpg"
                lines[split].append(
                    f"CheXpert-v1.0-small/{rel},{sex},{age},{view.capitalize()},"
                    f"{ap if view == 'frontal' else ''}," + ",".join(cells.values()) + "\n")
                jobs.append(_Job(rel, _image_seed(seed, rel), tuple(sorted(found)),
                                 view == "lateral", spec.side, "JPEG"))
    _write_images(root, jobs, num_workers)
    # CSVs last: an interrupted run leaves none, so the reader refuses it.
    for split, text in lines.items():
        storage.atomic_write_text(storage.join(root, f"{split}.csv"), "".join(text))
    return root


def make_nih_demo(out_dir: str, *, seed: int = 0, size: str = "small",
                  num_workers: int | None = None, overwrite: bool = False) -> str:
    """Write a synthetic ChestX-ray14 folder (``ChestX-ray14``) below ``out_dir``; returns it.
    Frontal views only; findings under their NIH names; official split lists included."""
    spec = _check(size, num_workers)
    root = start_demo_folder(out_dir, "ChestX-ray14", overwrite=overwrite,
                  meta={"format": "nih", "seed": seed, "size": size})
    rng = np.random.default_rng(seed + 7_919)  # not the CheXpert demo's patients
    lines = [("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
             "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")]
    jobs, test, train_val = [], [], []
    total = spec.train_patients + spec.valid_patients
    for number in range(1, total + 1):
        congestion, infection = _latent(rng), _latent(rng)
        sex, age = str(rng.choice(["F", "M"])), int(rng.integers(18, 90))
        for k in range(int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))):
            found = {x for x in _findings(rng, congestion, infection) if x in NIH_NAMES}
            names = sorted(NIH_NAMES[x] for x in found) or ["No Finding"]
            image = f"{number:08d}_{k:03d}.png"
            view = str(rng.choice(["PA", "AP"], p=[0.6, 0.4]))
            lines.append(f"{image},{'|'.join(names)},{k},{number},{age + k},{sex},{view},"
                         f"{spec.side},{spec.side},0.143,0.143\n")
            rel = f"images_{1 + (number - 1) * 3 // total:03d}/images/{image}"
            jobs.append(_Job(rel, _image_seed(seed, rel), tuple(sorted(found)), False,
                             spec.side, "PNG"))
            (test if number > spec.train_patients else train_val).append(image + "\n")
    _write_images(root, jobs, num_workers)
    storage.atomic_write_text(storage.join(root, "train_val_list.txt"), "".join(train_val))
    storage.atomic_write_text(storage.join(root, "test_list.txt"), "".join(test))
    storage.atomic_write_text(storage.join(root, "Data_Entry_2017_v2020.csv"), "".join(lines))
    return root
