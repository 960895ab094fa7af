"""Explain stage, the shortcut audit: do the maps point at the findings, or at the film markers?

Scored per member and for the ensemble, on test images, against the synthetic data's boxes
(``annotations.parquet``, written by ``raysearch demo-data`` beside ``MURA-v1.1``):

- ``pointing_hit_rate``: the share of abnormal images with a finding box whose map peaks inside
  one (the pointing game: Zhang et al., ECCV 2016, "Top-down Neural Attention by Excitation
  Backprop");
- ``finding_share`` and ``marker_share``: the share of the map's energy (its sum; maps are >= 0)
  inside the finding boxes, and inside the marker boxes, averaged over the images that have such
  a box (the "energy-based pointing game" of Score-CAM, Wang et al., CVPR 2020 workshops);
- the deletion check (after RISE's deletion metric, Petsiuk et al., BMVC 2018): the drop in the
  probability of the explained class when the top ``k`` share of the map's pixels are replaced by
  a blurred copy of the image (``deletion_drop``), against replacing as many random pixels
  (``random_drop``). ``deletion_gain`` = their difference: a map that points at what the model
  uses has a clearly positive gain. A blur, not zeros, is the baseline: zero in
  ImageNet-normalised space is a mid grey that a radiograph never shows.

A model is ``flagged`` when its ``marker_share`` exceeds ``threshold`` (default 0.01: markers
cover 1-4 % of a demo image; a model that ignores them keeps well under 1 % of its map there, see
the README's figures). Real data has no boxes:
then only the deletion check is reported (the other columns are NaN).

Outputs: ``audit.parquet`` (one row per model: ``model`` (a trial id or ``ensemble``), ``arch``,
``method``, ``label``, ``layer``, ``n_images``, ``n_pointing``, ``pointing_hit_rate``,
``finding_share``, ``finding_lift``, ``n_marker``, ``marker_share``, ``marker_lift``,
``deletion_drop``, ``random_drop``, ``deletion_gain``, ``flagged``; a lift is the mean energy
share over the boxes' mean share of the pixels: 1 for a uniform map) and ``audit_images.parquet`` (the same per image).

Never imports ray.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from raysearch.errors import DataError
from raysearch.storage import atomic_write_parquet, exists, join, read_parquet

__all__ = ["audit_images", "audit_table", "find_annotations", "run_audit", "summarise"]

ROOT_NAME = "MURA-v1.1"


def find_annotations(data_root: str) -> pd.DataFrame | None:
    """The ``annotations.parquet`` beside (or inside) the dataset folder ``data_root`` (the
    MURA-v1.1 folder or its parent), or None when there is none (real data)."""
    root = data_root.rstrip("/")
    candidates = [join(root, "annotations.parquet")]
    if root.rsplit("/", 1)[-1] == ROOT_NAME:
        candidates.insert(0, join(root.rsplit("/", 1)[0], "annotations.parquet"))
    for uri in candidates:
        if exists(uri):
            return read_parquet(uri)
    return None


def _key(path: str) -> str:
    """An image path as annotations.parquet names it (``MURA-v1.1/...``)."""
    at = str(path).rfind(f"{ROOT_NAME}/")
    return str(path)[at:] if at >= 0 else str(path)


def _mask(shape: tuple[int, int], boxes: pd.DataFrame) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for b in boxes.itertuples():
        m[int(b.y0):int(b.y1), int(b.x0):int(b.x1)] = True
    return m


def _share(heat: np.ndarray, mask: np.ndarray) -> float:
    total = float(heat.sum())
    return float(heat[mask].sum()) / total if total > 0 and mask.any() else math.nan


def _perturbed(gray: np.ndarray, blurred: np.ndarray, heat: np.ndarray, *, k: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(the top-k share of ``heat``'s pixels blurred, as many random pixels blurred)."""
    n = max(1, round(k * heat.size))
    top = np.argpartition(heat.ravel(), -n)[-n:]
    rand = rng.choice(heat.size, size=n, replace=False)
    out = []
    for idx in (top, rand):
        img = gray.copy().ravel()
        img[idx] = blurred.ravel()[idx]
        out.append(img.reshape(gray.shape))
    return out[0], out[1]


def audit_images(explainer, images: pd.DataFrame, boxes: pd.DataFrame | None, *,
                 k: float = 0.1, seed: int = 0, blur_radius: float = 0.04) -> pd.DataFrame:
    """One row per (image, model): ``image_path``, ``label`` (when ``images`` has it),
    ``model``, ``probability``, ``pointing_hit`` (NaN unless the image is abnormal with a finding
    box), ``finding_share``, ``marker_share`` (NaN without such boxes), ``finding_area``,
    ``marker_area`` (the boxes' share of the image's pixels), ``prob_top``,
    ``prob_random`` (after the deletion of the top-``k`` and of random pixels).

    ``images``: ``image_path`` (and ``label``) of the images to score; ``boxes``: the
    annotations (None: real data). ``blur_radius``: the Gaussian blur of the baseline, a share
    of the image's longer side."""
    from PIL import Image, ImageFilter

    predictor = explainer.predictor
    target = explainer.target
    rng = np.random.default_rng(seed)
    by_image = {} if boxes is None else dict(list(boxes.groupby("image_path")))
    rows = []
    for img in images.itertuples(index=False):
        ex = explainer.explain(img.image_path)
        gray = ex.gray
        mine = by_image.get(_key(img.image_path))
        finding = marker = None
        if mine is not None:
            finding = _mask(gray.shape, mine[mine["kind"] == "finding"])
            marker = _mask(gray.shape, mine[mine["kind"] == "marker"])
        label = getattr(img, "label", None)
        radius = blur_radius * max(gray.shape)
        blurred = np.asarray(Image.fromarray(gray).filter(ImageFilter.GaussianBlur(radius)))
        heats = {**ex.maps, "ensemble": ex.ensemble}
        probs = {**ex.probs, "ensemble": ex.prob}
        variants = []
        for heat in heats.values():
            variants += list(_perturbed(gray, blurred, heat, k=k, rng=rng))
        pred = predictor.predict(variants)
        for j, (model, heat) in enumerate(heats.items()):
            p = pred.probs if model == "ensemble" else pred.members[model]
            p = p[:, target.index].astype(np.float64)
            if target.sign < 0:
                p = 1.0 - p
            hit = math.nan
            if finding is not None and finding.any() and label == 1:
                py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
                hit = float(finding[py, px]) if heat.max() > 0 else 0.0
            rows.append({
                "image_path": str(img.image_path), "label": label, "model": model,
                "probability": float(probs[model]), "pointing_hit": hit,
                "finding_share": _share(heat, finding) if finding is not None else math.nan,
                "marker_share": _share(heat, marker) if marker is not None else math.nan,
                "finding_area": float(finding.mean()) if finding is not None else math.nan,
                "marker_area": float(marker.mean()) if marker is not None else math.nan,
                "prob_top": float(p[2 * j]), "prob_random": float(p[2 * j + 1]),
            })
    return pd.DataFrame(rows)


def _lift(shares: pd.Series, area: float) -> float:
    """Mean energy share over mean area share: 1 for a uniform map, above 1 where it gathers."""
    return float(shares.mean() / area) if len(shares) and area > 0 else math.nan


def summarise(per_image: pd.DataFrame, *, threshold: float, explainer) -> pd.DataFrame:
    """``audit.parquet``'s rows (see the module docstring) from :func:`audit_images`' table."""
    arch = {m.trial_id: m.config.arch for m in explainer.predictor.members}
    out = []
    for model, g in per_image.groupby("model", sort=False):
        drop = (g["probability"] - g["prob_top"]).mean()
        rand = (g["probability"] - g["prob_random"]).mean()
        marker = g["marker_share"].dropna()
        finding = g["finding_share"].dropna()
        marker_area = g.loc[marker.index, "marker_area"].mean()
        finding_area = g.loc[finding.index, "finding_area"].mean()
        out.append({
            "model": model, "arch": arch.get(model, "ensemble"), "method": explainer.method,
            "label": explainer.target.label, "layer": explainer.layer or "registered",
            "n_images": len(g), "n_pointing": int(g["pointing_hit"].notna().sum()),
            "pointing_hit_rate": float(g["pointing_hit"].mean()),
            "finding_share": float(finding.mean()) if len(finding) else math.nan,
            "finding_lift": _lift(finding, finding_area),
            "n_marker": len(marker), "marker_share": float(marker.mean()) if len(marker) else math.nan,
            "marker_lift": _lift(marker, marker_area),
            "deletion_drop": float(drop), "random_drop": float(rand),
            "deletion_gain": float(drop - rand),
            "flagged": bool(len(marker) and marker.mean() > threshold),
        })
    return pd.DataFrame(out)


def run_audit(
    *,
    ensemble: str | None = None,
    storage: str = "reports",
    data_root: str | None = None,
    method: str = "gradcam",
    label: str | None = None,
    layer: str | None = None,
    out: str = "explanations",
    max_images: int = 200,
    threshold: float = 0.01,
    k: float = 0.1,
    seed: int = 0,
    device=None,
    predictor=None,
    images: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """``raysearch explain --audit``: score the ensemble's maps on up to ``max_images`` test
    images (a seeded sample of the experiment's manifest's test split, or of ``images``) against the boxes in
    ``data_root``'s ``annotations.parquet`` (default: found from the manifest's image paths), and
    write ``audit.parquet`` and ``audit_images.parquet`` under ``out``. Returns the summary.

    Raises :class:`DataError` when there are no test images, and
    :class:`~raysearch.errors.ConfigError` for ``max_images`` < 1 or a bad method, label or
    layer."""
    from raysearch.errors import ConfigError
    from raysearch.explain.explainer import Explainer

    if max_images < 1:
        raise ConfigError(f"--max-images must be >= 1, got {max_images}")
    if not 0 < k < 1:
        raise ConfigError(f"k must be in (0, 1), got {k}")
    source = None
    if predictor is None:
        from raysearch.experiment import check_model_folder, find_experiment
        from raysearch.inference.predictor import Predictor

        source = check_model_folder(ensemble or find_experiment(None, storage=storage))
        predictor = Predictor.from_dir(source, device=device)
    explainer = Explainer(predictor, method=method, label=label, layer=layer)
    if images is None:
        if source is None:
            raise ConfigError("run_audit: give the images to audit with a predictor")
        from raysearch.experiment.trials import read_manifest
        from raysearch.explain.run import model_folders

        manifest = read_manifest(model_folders(source)[1])
        images = manifest[manifest["split"] == "test"]
        if images.empty:
            raise DataError("the experiment has no test images to audit")
    if len(images) > max_images:
        images = images.sample(n=max_images, random_state=seed)
    if data_root is None:
        first = str(images["image_path"].iloc[0])
        at = first.rfind(f"/{ROOT_NAME}/")
        data_root = first[:at] if at >= 0 else first.rsplit("/", 1)[0]
    boxes = find_annotations(data_root)
    per_image = audit_images(explainer, images, boxes, k=k, seed=seed)
    summary = summarise(per_image, threshold=threshold, explainer=explainer)
    atomic_write_parquet(per_image, join(out, "audit_images.parquet"))
    atomic_write_parquet(summary, join(out, "audit.parquet"))
    return summary


def audit_table(summary: pd.DataFrame, *, threshold: float):
    """A rich table of the summary: one row per model, the flagged ones marked."""
    from rich.table import Table

    t = Table(title=f"shortcut audit (flag: marker share > {threshold:g})")
    for col in ("model", "arch", "images", "pointing", "finding share", "marker share",
                "marker lift", "deletion drop", "random drop", "flag"):
        t.add_column(col, justify="left" if col in ("model", "arch", "flag") else "right")

    def f(x: float) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    for r in summary.itertuples():
        t.add_row(str(r.model), str(r.arch), str(r.n_images), f(r.pointing_hit_rate),
                  f(r.finding_share), f(r.marker_share), f(r.marker_lift), f(r.deletion_drop),
                  f(r.random_drop),
                  "[red]SHORTCUT[/]" if r.flagged else "")
    return t


