"""Data stage, demo input: synthetic radiographs in exactly the MURA-v1.1 layout.

``make_demo_data`` writes
``MURA-v1.1/{train,valid}/XR_<PART>/patientNNNNN/studyK_{positive,negative}/imageJ.png`` plus the
four header-less CSVs, so every later stage runs unchanged on the demo and on the real dataset.
Pictures are drawn procedurally: a soft-tissue glow; bones with a bright cortex and a darker
medulla, in a geometry typical of each body part; noise; and for abnormal studies a finding
(fracture line, metal hardware or a lesion) on some or all views. Most findings are visible at
64-96 px; a minority are hairline-thin and show only at higher resolution, so image size matters.

Output is a pure function of the seed: the study plan comes from one seeded generator, and every
image draws from its own generator keyed by its path, so worker count and order do not matter.
"""

from __future__ import annotations

import io
import json
import math
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from raysearch import storage
from raysearch.errors import ConfigError, DataError

__all__ = ["ANNOTATIONS", "BOX_KINDS", "DEMO_SIZES", "DemoSize", "make_demo_data"]

ROOT_NAME = "MURA-v1.1"
DEMO_MARKER = ".raysearch-demo.json"  # marks a folder demo-data may replace
ANNOTATIONS = "annotations.parquet"  # the boxes, beside the MURA-v1.1 folder


@dataclass(frozen=True)
class DemoSize:
    train_patients: int
    valid_patients: int
    min_side: int  # range of the longest image side, in pixels
    max_side: int


DEMO_SIZES: dict[str, DemoSize] = {
    # Approximate image counts: tiny ~150, small ~1.9k, medium ~9k, large ~38k (MURA scale).
    "tiny": DemoSize(train_patients=35, valid_patients=12, min_side=96, max_side=160),
    "small": DemoSize(train_patients=500, valid_patients=135, min_side=256, max_side=384),
    "medium": DemoSize(train_patients=2500, valid_patients=540, min_side=256, max_side=512),
    "large": DemoSize(train_patients=12000, valid_patients=800, min_side=320, max_side=512),
}

# Share of studies and abnormal fraction per body part, roughly as in MURA's training set.
PART_WEIGHTS = {
    "ELBOW": 0.14, "FINGER": 0.16, "FOREARM": 0.08, "HAND": 0.16,
    "HUMERUS": 0.05, "SHOULDER": 0.22, "WRIST": 0.19,
}  # fmt: skip
ABNORMAL_FRACTION = {
    "ELBOW": 0.40, "FINGER": 0.43, "FOREARM": 0.39, "HAND": 0.30,
    "HUMERUS": 0.48, "SHOULDER": 0.50, "WRIST": 0.41,
}  # fmt: skip
FINDINGS = ("hardware", "fracture", "lesion", "hairline", "small_lesion")
FINDING_WEIGHTS = (0.3, 0.35, 0.15, 0.12, 0.08)  # the last two are the subtle ones
# Each view of an abnormal study shows its finding with this chance (and at least one view does).
VIEW_HAS_FINDING = 0.85


@dataclass(frozen=True)
class _ImageJob:
    rel_path: str  # path below the MURA-v1.1 folder
    seed: int
    body_part: str
    finding: str | None
    shown: bool = False  # the study's label as written (after label noise)
    shortcut: float | None = None  # P(the marker follows the label); None: independent


# The kinds of box in annotations.parquet.
BOX_KINDS = ("finding", "marker")


# ---------------------------------------------------------------------------------------------
# Study plan: who has which studies, labels, views. Drawn from one generator.


def _plan(size: DemoSize, *, seed: int, label_noise: float,
          shortcut: float | None = None) -> tuple[list[_ImageJob], dict]:
    rng = np.random.default_rng(seed)
    parts = list(PART_WEIGHTS)
    weights = np.array([PART_WEIGHTS[p] for p in parts])
    weights = weights / weights.sum()
    jobs: list[_ImageJob] = []
    csv_rows: dict[str, tuple[list[str], list[str]]] = {"train": ([], []), "valid": ([], [])}
    # Valid patients take the id range after the train patients, as in real MURA.
    patients = [("train", i + 1) for i in range(size.train_patients)]
    patients += [("valid", size.train_patients + i + 1) for i in range(size.valid_patients)]
    for split, number in patients:
        patient = f"patient{number:05d}"
        n_studies = int(rng.choice([1, 2, 3], p=[0.8, 0.15, 0.05]))
        part = parts[int(rng.choice(len(parts), p=weights))]
        study_numbers: dict[str, int] = {}
        for k in range(n_studies):
            if k > 0 and rng.random() < 0.25:
                part = parts[int(rng.choice(len(parts), p=weights))]
            study_numbers[part] = study_numbers.get(part, 0) + 1
            abnormal = bool(rng.random() < ABNORMAL_FRACTION[part])
            shown = abnormal ^ bool(rng.random() < label_noise)  # the label in folder and CSV
            folder = f"{split}/XR_{part}/{patient}/study{study_numbers[part]}_" + (
                "positive" if shown else "negative"
            )
            n_views = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.35, 0.35, 0.15]))
            finding = str(rng.choice(FINDINGS, p=FINDING_WEIGHTS)) if abnormal else None
            with_finding = rng.random(n_views) < VIEW_HAS_FINDING
            if finding is not None and not with_finding.any():
                with_finding[int(rng.integers(n_views))] = True
            image_lines, study_lines = csv_rows[split]
            study_lines.append(f"{ROOT_NAME}/{folder}/,{int(shown)}\n")
            for j in range(n_views):
                rel = f"{folder}/image{j + 1}.png"
                image_lines.append(f"{ROOT_NAME}/{rel}\n")
                # Each image's generator depends only on the seed and its path.
                img_seed = (seed * 1_000_003 + zlib.crc32(rel.encode())) % 2**63
                jobs.append(_ImageJob(rel, img_seed, part, finding if with_finding[j] else None,
                                      shown=shown, shortcut=shortcut))
    return jobs, csv_rows


# ---------------------------------------------------------------------------------------------
# Bone geometry per body part, in a unit frame (x right, y down, roughly [-1, 1]).
# A rod is ("rod", x0, y0, x1, y1, width); a blob is ("blob", cx, cy, rx, ry).


def _digit(x: float, y: float, angle: float, lengths: list[float], width: float, rng) -> list:
    """Phalanges in a row from (x, y) pointing at ``angle`` (radians, 0 = up), small gaps."""
    rods = []
    for i, length in enumerate(lengths):
        angle += rng.normal(0, 0.06)
        x1, y1 = x + length * math.sin(angle), y - length * math.cos(angle)
        rods.append(("rod", x, y, x1, y1, width * (0.92**i)))
        gap = 0.06 * width / 0.1
        x, y = x1 + gap * math.sin(angle), y1 - gap * math.cos(angle)
    return rods


def _bones(part: str, rng: np.random.Generator) -> list:
    j = lambda s=0.03: rng.normal(0, s)  # small anatomical jitter
    if part == "FINGER":
        rods = [("rod", j(), 1.35, j(), 0.95, 0.25)]  # metacarpal head at the bottom
        return rods + _digit(j(), 0.85, j(0.08), [0.75, 0.5, 0.35], 0.22, rng)
    if part == "HAND":
        shapes = [("blob", -0.25 + 0.17 * i + j(), 0.78 + j(), 0.09, 0.07) for i in range(4)]
        shapes += [("blob", -0.2 + 0.2 * i + j(), 0.62 + j(), 0.08, 0.06) for i in range(3)]
        for i in range(4):
            xb, spread = -0.28 + 0.19 * i + j(), (i - 1.5) * 0.12
            xt = xb + 0.5 * math.sin(spread)
            shapes.append(("rod", xb, 0.5, xt, 0.0 + j(), 0.085))
            lengths = [0.38, 0.24, 0.17] if i in (1, 2) else [0.33, 0.2, 0.15]
            shapes += _digit(xt, -0.05, spread + j(0.05), lengths, 0.075, rng)
        shapes.append(("rod", -0.42, 0.55, -0.65, 0.15, 0.09))  # thumb
        return shapes + _digit(-0.68, 0.1, -0.75 + j(0.1), [0.3, 0.22], 0.08, rng)
    if part == "WRIST":
        shapes = [("rod", -0.25 + j(), 1.25, -0.2 + j(), 0.3, 0.3), ("blob", -0.2, 0.28, 0.23, 0.1)]
        shapes += [("rod", 0.3 + j(), 1.25, 0.26 + j(), 0.38, 0.17)]
        for r, y in enumerate((0.08, -0.16)):
            shapes += [("blob", -0.3 + 0.2 * i + j(), y + j(), 0.1, 0.085) for i in range(4 - r)]
        return shapes + [
            ("rod", -0.3 + 0.2 * i, -0.35, -0.38 + 0.26 * i, -1.1, 0.1) for i in range(4)
        ]
    if part == "FOREARM":
        bow = j(0.05)
        return [
            ("rod", -0.22 + j(), -1.0, -0.15 + bow, 1.0, 0.19),
            ("rod", 0.2 + j(), -1.0, 0.22 + bow, 1.0, 0.15),
            ("blob", -0.15 + bow, 1.0, 0.16, 0.08),
        ]
    if part == "ELBOW":
        a = 0.35 + rng.uniform(0, 0.5)  # flexion angle of the forearm
        dx, dy = math.sin(a), math.cos(a)
        return [
            ("rod", j(), -1.1, 0.0, -0.1, 0.32),
            ("blob", 0.0, -0.05, 0.36, 0.17),
            ("rod", -0.12, 0.12, -0.12 + 1.1 * dx, 0.12 + 1.1 * dy, 0.17),
            ("rod", 0.1, 0.05, 0.1 + 1.1 * dx, 0.05 + 1.1 * dy, 0.15),
        ]
    if part == "HUMERUS":
        return [
            ("blob", j(), -0.85, 0.3, 0.27),
            ("rod", 0.0, -0.8, j(), 0.85, 0.28),
            ("blob", 0.0, 0.92, 0.3, 0.1),
        ]
    if part == "SHOULDER":
        return [
            ("rod", -0.45, -0.25, -0.95 + j(), 0.8, 0.38),  # scapula body
            ("rod", -1.1, -0.72 + j(), 0.45, -0.55 + j(), 0.13),  # clavicle
            ("blob", -0.33, 0.0, 0.1, 0.3),  # glenoid
            ("rod", 0.2, 0.15, 0.32 + j(), 1.2, 0.33),  # humeral shaft
            ("blob", 0.1 + j(), 0.0, 0.37, 0.37),  # humeral head
        ]
    raise ConfigError(f"unknown body part {part!r}")  # internal callers pass PART_WEIGHTS keys


# ---------------------------------------------------------------------------------------------
# Rendering one image


def _render(job: _ImageJob, min_side: int, max_side: int) -> bytes:
    """The PNG bytes of one image."""
    return _render_boxed(job, min_side, max_side)[0]


def _render_boxed(job: _ImageJob, min_side: int, max_side: int) -> tuple[bytes, list[tuple]]:
    """The PNG bytes of one image and its boxes: ``(kind, x0, y0, x1, y1)`` in pixels of the
    image (x right, y down, inclusive-exclusive), one per finding and per L/R marker drawn."""
    boxes: list[tuple] = []
    rng = np.random.default_rng(job.seed)
    long_side = int(rng.integers(min_side, max_side + 1))
    short_side = int(long_side * rng.uniform(0.65, 1.0))
    w, h = (short_side, long_side) if rng.random() < 0.85 else (long_side, short_side)

    theta = rng.normal(0, 0.25)
    scale = 0.42 * min(w, h) * rng.uniform(0.85, 1.1) * (1.15 if h > w else 1.0)
    cx, cy = w / 2 + rng.normal(0, 0.04 * w), h / 2 + rng.normal(0, 0.04 * h)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    cos, sin = math.cos(theta), math.sin(theta)

    def pt(x: float, y: float) -> tuple[float, float]:
        x *= flip
        return cx + scale * (cos * x - sin * y), cy + scale * (sin * x + cos * y)

    shapes = _bones(job.body_part, rng)
    background, tissue = rng.uniform(5, 25), rng.uniform(55, 95)
    cortex = rng.uniform(175, 215)  # below metal (255), so hardware stands out
    medulla = cortex - rng.uniform(40, 70)

    # Soft tissue: the bones' outline, widened and blurred into a glow.
    # Drawn and blurred at quarter resolution: the glow is smooth, and this halves render time.
    glow = Image.new("L", (w // 4, h // 4), 0)
    draw = ImageDraw.Draw(glow)
    quarter = lambda x, y: tuple(v / 4 for v in pt(x, y))
    for s in shapes:
        _draw_shape(draw, s, quarter, scale / 4, grow=2.6, fill=255)
    glow = glow.filter(ImageFilter.GaussianBlur(0.0125 * min(w, h))).resize((w, h), Image.BILINEAR)
    img = Image.fromarray(
        (background + (tissue - background) * np.asarray(glow, np.float32) / 255).astype(np.uint8)
    )
    draw = ImageDraw.Draw(img)
    for s in shapes:
        _draw_shape(draw, s, pt, scale, grow=1.0, fill=int(cortex))
        _draw_shape(draw, s, pt, scale, grow=0.5, fill=int(medulla), inset=True)
    if job.finding is not None:
        rods = [s for s in shapes if s[0] == "rod"]
        box = _draw_finding(draw, job.finding, rods[int(rng.integers(len(rods)))], pt, scale, rng,
                            side=min(w, h), tissue=int(tissue), cortex=int(cortex))  # fmt: skip
        boxes.append(("finding", *_clip(box, w, h)))

    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.0)))
    # L/R film marker: independent of the label (a known distractor), or, with a shortcut P,
    # present exactly on the abnormal studies' images with probability P (Zech et al. 2018:
    # laterality markers and hospital tokens that a model learns in place of the finding).
    marker = rng.random() < 0.5
    if job.shortcut is not None and rng.random() < job.shortcut:
        marker = job.shown
    if marker:
        boxes.append(("marker", *_clip(_draw_marker(img, rng, large=job.shortcut is not None),
                                       w, h)))
    pixels = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(1.5, 5), (h, w))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    if rng.random() < 0.08:  # inverted polarity
        pixels = 255 - pixels
    out = Image.fromarray(pixels)
    if rng.random() < 0.15:  # some MURA files are stored as RGB
        out = out.convert("RGB")
    buf = io.BytesIO()
    out.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), boxes


def _clip(box, w: int, h: int) -> tuple[int, int, int, int]:
    """A float box ``(x0, y0, x1, y1)`` grown by 2 px (the blur spreads edges) to whole pixels
    inside the image."""
    x0, y0, x1, y1 = box
    return (max(0, math.floor(x0) - 2), max(0, math.floor(y0) - 2),
            min(w, math.ceil(x1) + 2), min(h, math.ceil(y1) + 2))


def _line_box(points, width: float) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    r = width / 2
    return min(xs) - r, min(ys) - r, max(xs) + r, max(ys) + r


def _union(a, b):
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def _draw_shape(draw, shape, pt, scale, *, grow: float, fill: int, inset: bool = False) -> None:
    if shape[0] == "blob":
        _, x, y, rx, ry = shape
        (px, py), rx, ry = pt(x, y), rx * scale * grow, ry * scale * grow
        if inset:
            rx, ry = rx * 1.3, ry * 1.3  # a blob's medulla is its inner 65 %
        draw.ellipse([px - rx, py - ry, px + rx, py + ry], fill=fill)
        return
    _, x0, y0, x1, y1, width = shape
    (a, b), (c, d) = pt(x0, y0), pt(x1, y1)
    wpx = max(1.0, width * scale * grow)
    if inset:  # stop the medulla short of the ends so the cortex closes around them
        length = math.hypot(c - a, d - b) or 1.0
        ux, uy = (c - a) / length, (d - b) / length
        cut = min(0.4 * length, wpx)
        a, b, c, d = a + ux * cut, b + uy * cut, c - ux * cut, d - uy * cut
    draw.line([(a, b), (c, d)], fill=fill, width=round(wpx))
    r = 0.62 * wpx if not inset else 0.5 * wpx  # bulbous ends (epiphyses)
    for px, py in ((a, b), (c, d)):
        draw.ellipse([px - r, py - r, px + r, py + r], fill=fill)


def _draw_finding(draw, kind: str, rod, pt, scale, rng, *, side: int, tissue: int, cortex: int):
    """Draw a finding on ``rod``. Visible kinds have a floor relative to the image side (``side``
    px), so they survive downscaling to 64-96 px even on thin bones; subtle kinds do not."""
    _, x0, y0, x1, y1, width = rod
    t = rng.uniform(0.3, 0.7)
    mx, my = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
    length = math.hypot(x1 - x0, y1 - y0) or 1.0
    ux, uy = (x1 - x0) / length, (y1 - y0) / length  # along the bone
    nx, ny = -uy, ux  # across it
    unit = side / scale  # the image's short side in bone-frame units
    if kind in ("fracture", "hairline"):
        tilt = rng.uniform(-0.5, 0.5)
        dx, dy = nx + tilt * ux, ny + tilt * uy
        half = max(0.75 * width, 0.1 * unit) if kind == "fracture" else 0.75 * width
        line = [pt(mx - half * dx, my - half * dy), pt(mx + half * dx, my + half * dy)]
        gap = max(0.3 * width, 0.06 * unit) * scale
        lw = max(2, int(gap)) if kind == "fracture" else 1
        draw.line(line, fill=tissue, width=lw)
        box = _line_box(line, lw)
        if kind == "fracture":  # a displaced fragment: a bright step beside the gap
            sx, sy = 0.6 * half * nx, 0.6 * half * ny
            step = [pt(mx + sx, my + sy), pt(mx + sx + 0.25 * ux, my + sy + 0.25 * uy)]
            draw.line(step, fill=cortex, width=max(2, int(0.5 * gap)))  # fmt: skip
            box = _union(box, _line_box(step, max(2, int(0.5 * gap))))
        return box
    elif kind == "hardware":
        thick = max(0.3 * width, 0.06 * unit)
        off = (0.5 * width + 0.5 * thick) * (1 if rng.random() < 0.5 else -1)
        span = max(rng.uniform(0.2, 0.3) * length, 0.2 * unit)
        a = pt(mx + off * nx - span * ux, my + off * ny - span * uy)
        b = pt(mx + off * nx + span * ux, my + off * ny + span * uy)
        draw.line([a, b], fill=255, width=max(2, int(thick * scale)))  # plate
        box = _line_box([a, b], max(2, int(thick * scale)))
        reach = max(0.7 * width, 0.08 * unit)
        for k in np.linspace(-0.8, 0.8, int(rng.integers(3, 6))):
            sx, sy = mx + k * span * ux, my + k * span * uy
            screw = [pt(sx - reach * nx, sy - reach * ny), pt(sx + reach * nx, sy + reach * ny)]
            draw.line(screw, fill=255, width=max(2, int(0.5 * thick * scale)))  # fmt: skip
            box = _union(box, _line_box(screw, max(2, int(0.5 * thick * scale))))
        return box
    else:  # lesion: a lytic (dark) blob with a sclerotic rim, large or small
        if kind == "lesion":
            r = max(rng.uniform(0.35, 0.5) * width, rng.uniform(0.08, 0.11) * unit) * scale
        else:
            r = rng.uniform(0.1, 0.15) * width * scale
        px, py = pt(mx, my)
        draw.ellipse([px - r, py - r, px + r, py + r], fill=tissue, outline=255,
                     width=max(1, int(0.2 * r)))  # fmt: skip
        return px - r, py - r, px + r, py + r


def _draw_marker(img: Image.Image, rng: np.random.Generator, *, large: bool = False) -> tuple:
    """Draw an "L" or "R" in a corner; return its box ``(x0, y0, x1, y1)``. ``large`` (the
    shortcut variant) draws it at 20 % of the short side instead of 7 %, so that it survives
    downscaling to the 32-64 px of a quick demo search: a shortcut a small CNN can take."""
    w, h = img.size
    size = max(8, int((0.2 if large else 0.07) * min(w, h)))
    font = ImageFont.load_default(size=size)
    x = int(rng.uniform(0.04, 0.2) * w) if rng.random() < 0.5 else int(rng.uniform(0.72, 0.88) * w)
    y = int(rng.uniform(0.04, 0.12) * h) if rng.random() < 0.5 else int(rng.uniform(0.8, 0.88) * h)
    draw = ImageDraw.Draw(img)
    text = "L" if rng.random() < 0.5 else "R"
    draw.text((x, y), text, fill=255, font=font)
    return draw.textbbox((x, y), text, font=font)


def _render_chunk(args: tuple[list[_ImageJob], int, int]) -> list[tuple[bytes, list[tuple]]]:
    jobs, min_side, max_side = args
    return [_render_boxed(job, min_side, max_side) for job in jobs]


# ---------------------------------------------------------------------------------------------
# Public entry point


def make_demo_data(
    out_dir: str,
    *,
    seed: int = 0,
    size: str = "small",
    label_noise: float = 0.03,
    num_workers: int | None = None,
    overwrite: bool = False,
    shortcut: float | None = None,
) -> str:
    """Write a synthetic MURA-v1.1 dataset below ``out_dir`` and return the MURA-v1.1 folder path.

    ``out_dir`` may be a local path or an fsspec URL (``memory://``, ``gs://``). The same seed and
    size always give the same bytes. ``num_workers`` processes render the images (default: the
    CPU count, capped at 4; 1 renders in this process). An existing ``MURA-v1.1`` folder is an
    error unless ``overwrite=True``, which deletes it first so no stale files remain.

    Beside the MURA-v1.1 folder (it is no part of MURA's layout), ``annotations.parquet`` holds
    the ground truth the generator knows: one row per box, ``image_path`` (as in the CSVs:
    ``MURA-v1.1/...png``), ``kind`` (``finding`` or ``marker``), ``detail`` (the finding's kind,
    or empty), ``x0, y0, x1, y1`` (int, pixels of the image, x right, y down, x1 and y1
    exclusive), ``label`` (the study's label as written). ``shortcut`` P in [0, 1] ties the L/R
    marker to the label: with probability P an image carries a (larger) marker exactly when its
    study is labelled abnormal; without it, markers are independent of the label and the images
    and CSVs are those this function has always written.
    """
    if size not in DEMO_SIZES:
        raise ConfigError(f"unknown demo size {size!r}; choose one of {', '.join(DEMO_SIZES)}")
    if not 0.0 <= label_noise < 0.5:
        raise ConfigError(f"label_noise must be in [0, 0.5), got {label_noise}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an int >= 0, got {seed!r}")  # numpy's generators
    if shortcut is not None and not 0.0 <= shortcut <= 1.0:
        raise ConfigError(f"shortcut must be in [0, 1], got {shortcut}")
    if num_workers is not None and num_workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
    spec = DEMO_SIZES[size]
    settings = {"seed": seed, "size": size, "label_noise": label_noise}
    if shortcut is not None:
        settings["shortcut"] = shortcut
    root = start_demo_folder(out_dir, ROOT_NAME, overwrite=overwrite, meta=settings)
    fs, root_path = storage.get_fs(root)

    jobs, csv_rows = _plan(spec, seed=seed, label_noise=label_noise, shortcut=shortcut)
    workers = num_workers or min(os.cpu_count() or 1, 4)
    chunk = 64
    chunks = [
        (jobs[i : i + chunk], spec.min_side, spec.max_side) for i in range(0, len(jobs), chunk)
    ]
    local = not storage.is_url(root)
    made_dirs: set[str] = set()

    boxes: list[tuple] = []

    def write(job: _ImageJob, rendered: tuple[bytes, list[tuple]]) -> None:
        data, drawn = rendered
        image = f"{ROOT_NAME}/{job.rel_path}"
        boxes.extend((image, kind, (job.finding or "") if kind == "finding" else "", *box,
                      int(job.shown)) for kind, *box in drawn)
        path = f"{root_path}/{job.rel_path}"
        parent = path.rsplit("/", 1)[0]
        if parent not in made_dirs:
            fs.makedirs(parent, exist_ok=True)
            made_dirs.add(parent)
        if local:
            with open(path, "wb") as f:
                f.write(data)
        else:
            fs.pipe_file(path, data)

    if workers > 1 and len(chunks) > 1:
        # spawn, not fork: the caller may hold Ray or torch threads that do not survive a fork.
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=get_context("spawn")) as ex:
            for (batch, _, _), images in zip(chunks, ex.map(_render_chunk, chunks)):
                for job, data in zip(batch, images):
                    write(job, data)
    else:
        for batch in chunks:
            for job, data in zip(batch[0], _render_chunk(batch)):
                write(job, data)

    import pandas as pd

    table = pd.DataFrame(boxes, columns=["image_path", "kind", "detail", "x0", "y0", "x1", "y1",
                                         "label"])
    storage.atomic_write_parquet(table, storage.join(out_dir, ANNOTATIONS))
    # CSVs last: an interrupted run leaves no CSV, so the reader refuses it instead of half-reading.
    for split, (image_lines, study_lines) in csv_rows.items():
        storage.atomic_write_text(
            storage.join(root, f"{split}_image_paths.csv"), "".join(image_lines)
        )
        storage.atomic_write_text(
            storage.join(root, f"{split}_labeled_studies.csv"), "".join(study_lines)
        )
    return root


def start_demo_folder(out_dir: str, name: str, *, overwrite: bool, meta: dict) -> str:
    """The demo dataset folder ``out_dir/name``, with its marker (``meta`` as JSON) written.

    An existing folder is replaced only with ``overwrite`` and only when this module made it
    (it holds :data:`DEMO_MARKER`): a real dataset under the same parent must survive a
    mistyped --overwrite. The marker comes first, so that an interrupted run can still be
    replaced. Raises DataError otherwise."""
    root = storage.join(out_dir, name)
    fs, root_path = storage.get_fs(root)
    if fs.exists(root_path):
        if not overwrite:
            raise DataError(f"{root} already exists; choose another folder, or --overwrite "
                            "(overwrite=True) to replace demo data made here before")
        if not fs.exists(f"{root_path}/{DEMO_MARKER}"):
            raise DataError(f"{root} was not made by raysearch demo-data (it has no "
                            f"{DEMO_MARKER}); refusing to delete it: choose another folder")
        fs.rm(root_path, recursive=True)
    storage.atomic_write_text(storage.join(root, DEMO_MARKER), json.dumps(meta) + "\n")
    return root
