"""Explain stage, ``raysearch explain``: maps for chosen images of a trained ensemble, written
to disk.

Which images (one of):

- ``inputs``: image files, folders of studies or a CSV, as ``raysearch predict`` takes them;
- ``studies``: study ids of the experiment's data (its ensemble's test predictions, else its
  manifest);
- ``worst``: the N most confident false positives and the N most confident false negatives
  among the test studies (the ensemble's ``study_predictions.parquet``, else predicted now): what
  a reviewer looks at first.

Outputs under ``out``, every file written atomically:

- ``maps/<study>/<image>/<member>.npy``: each member's unnormalised map (float32, original
  pixels), and ``ensemble.npy`` (the ensemble map, in [0, 1]);
- ``overlays/<study>/<image>.png``: the ensemble map over the radiograph;
- ``studies/<study>.png``: a contact sheet, one row per image, one panel per member and the
  ensemble;
- ``explanations.parquet``: one row per (image, member or ``ensemble``): ``study_id``,
  ``image_path``, ``member``, ``method``, ``label`` (the explained class), ``layer``,
  ``probability`` (of the explained class), ``map_path`` (relative to ``out``), ``peak_x``,
  ``peak_y`` (the map's maximum, original pixels), ``error`` (``FP``/``FN`` with ``worst``).

Never imports ray.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from raysearch.errors import ConfigError, DataError, name_some
from raysearch.storage import atomic_write_bytes, atomic_write_parquet, exists, join, read_parquet

__all__ = ["model_folders", "run_explain", "select_images"]


def model_folders(path: str) -> tuple[str | None, str]:
    """(ensemble folder or None, experiment folder) of an ensemble or experiment folder."""
    path = path.rstrip("/")
    if exists(join(path, "members.parquet")):
        return path, path.rsplit("/", 1)[0]
    if exists(join(path, "ensemble", "members.parquet")):
        return join(path, "ensemble"), path
    return None, path


def _known_images(ensemble_dir: str | None, experiment: str) -> pd.DataFrame:
    """Every image the experiment knows: the ensemble's image predictions (with labels and
    probabilities) when there are some, else the manifest."""
    if ensemble_dir and exists(join(ensemble_dir, "image_predictions.parquet")):
        return read_parquet(join(ensemble_dir, "image_predictions.parquet"))
    from raysearch.experiment.trials import read_manifest

    return read_manifest(experiment)


def select_images(
    *,
    source: str,
    inputs: Sequence[str] = (),
    studies: Sequence[str] = (),
    worst: int | None = None,
    predictor=None,
) -> pd.DataFrame:
    """The images to explain (``image_path``, ``study_id``, and ``error`` with ``worst``).

    ``source`` is the ensemble or experiment folder. Exactly one of ``inputs``, ``studies`` and
    ``worst`` is given. Raises :class:`ConfigError` otherwise, and :class:`DataError` naming an
    unknown study id or when the test split has no such errors."""
    given = [bool(inputs), bool(studies), worst is not None]
    if sum(given) != 1:
        raise ConfigError("explain: give exactly one of INPUT..., --studies ID... or --worst N")
    if inputs:
        from raysearch.inference.predict import collect_images

        return collect_images(inputs).images[["image_path", "study_id"]]
    ensemble_dir, experiment = model_folders(source)
    known = _known_images(ensemble_dir, experiment)
    if studies:
        ids = set(known["study_id"].astype(str))
        unknown = [s for s in studies if s not in ids]
        if unknown:
            raise DataError(f"unknown study id {name_some(unknown)} in {experiment} (known, "
                            f"e.g.: {name_some(sorted(ids), limit=2)})")
        picked = known[known["study_id"].astype(str).isin(list(studies))]
        return picked[["image_path", "study_id"]].drop_duplicates("image_path").reset_index(drop=True)
    if worst < 1:
        raise ConfigError(f"--worst must be >= 1, got {worst}")
    test_studies = _test_studies(ensemble_dir, known, predictor)
    fp = test_studies[(test_studies["label"] == 0) & (test_studies["pred"] == 1)]
    fn = test_studies[(test_studies["label"] == 1) & (test_studies["pred"] == 0)]
    chosen = pd.concat([
        fp.sort_values("prob", ascending=False, kind="stable").head(worst).assign(error="FP"),
        fn.sort_values("prob", ascending=True, kind="stable").head(worst).assign(error="FN"),
    ])
    if chosen.empty:
        raise DataError(f"no false positive or false negative among the {len(test_studies)} test "
                        "studies: nothing to show with --worst")
    test = known[known["split"] == "test"] if "split" in known.columns else known
    images = test.merge(chosen[["study_id", "error"]], on="study_id")
    return images[["image_path", "study_id", "error"]].drop_duplicates("image_path").reset_index(
        drop=True)


def _test_studies(ensemble_dir, known: pd.DataFrame, predictor) -> pd.DataFrame:
    """Test studies with ``label``, ``prob`` and ``pred``: the ensemble's saved ones, else
    predicted now with ``predictor``."""
    if ensemble_dir and exists(join(ensemble_dir, "study_predictions.parquet")):
        studies = read_parquet(join(ensemble_dir, "study_predictions.parquet"))
        return studies[studies["split"] == "test"]
    if "split" not in known.columns or "label" not in known.columns:
        raise DataError("--worst needs the test split with labels (the experiment's manifest)")
    test = known[known["split"] == "test"].reset_index(drop=True)
    if test.empty:
        raise DataError("the experiment has no test split to pick --worst studies from")
    if predictor.task.k != 1:
        raise ConfigError("--worst needs a task of one label")
    _, studies = predictor.predict_studies(test)
    labels = test.groupby("study_id")["label"].first()
    studies["label"] = studies["study_id"].map(labels).astype(int)
    return studies


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a.astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def run_explain(
    inputs: Sequence[str] = (),
    *,
    ensemble: str | None = None,
    storage: str = "reports",
    studies: Sequence[str] = (),
    worst: int | None = None,
    method: str = "gradcam",
    label: str | None = None,
    layer: str | None = None,
    out: str = "explanations",
    device=None,
    console=None,
) -> pd.DataFrame:
    """``raysearch explain``: explain the chosen images (see :func:`select_images`) with the
    ensemble (default: the most recent experiment under ``storage``) and write the outputs (see
    the module docstring) under ``out``. Returns the ``explanations.parquet`` table.

    Raises :class:`ConfigError` for a bad method, label or layer (before any model runs),
    :class:`DataError` for unknown study ids and unreadable images, and
    :class:`~raysearch.errors.CheckpointError` for a member whose checkpoint is missing."""
    from raysearch.experiment import check_model_folder, find_experiment
    from raysearch.explain.explainer import Explainer
    from raysearch.explain.plots import contact_sheet, overlay_png
    from raysearch.inference.predictor import Predictor

    source = check_model_folder(ensemble or find_experiment(None, storage=storage))
    predictor = Predictor.from_dir(source, device=device)
    explainer = Explainer(predictor, method=method, label=label, layer=layer)
    images = select_images(source=source, inputs=inputs, studies=studies, worst=worst,
                           predictor=predictor)
    target = explainer.target.label
    rows: list[dict] = []
    sheets: dict[str, list] = {}
    for i, img in enumerate(images.itertuples(index=False)):
        ex = explainer.explain(img.image_path)
        study, name = _slug(img.study_id), f"{i:04d}_{_slug(str(img.image_path).rsplit('/', 1)[-1])}"
        panels = [*ex.maps.items(), ("ensemble", ex.ensemble)]
        probs = {**ex.probs, "ensemble": ex.prob}
        for member, heat in panels:
            rel = f"maps/{study}/{name}/{_slug(member)}.npy"
            atomic_write_bytes(join(out, rel), _npy(heat))
            py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
            rows.append({"study_id": str(img.study_id), "image_path": str(img.image_path),
                         "member": member, "method": method, "label": target,
                         "layer": layer or "registered", "probability": float(probs[member]),
                         "map_path": rel, "peak_x": int(px), "peak_y": int(py),
                         "error": getattr(img, "error", None)})
        title = f"{img.study_id} · {method} · {target} p={ex.prob:.2f}"
        atomic_write_bytes(join(out, f"overlays/{study}/{name}.png"),
                           overlay_png(ex.gray, ex.ensemble, title=title))
        sheets.setdefault(str(img.study_id), []).append(
            (ex.gray, [(f"{m} p={probs[m]:.2f}", h) for m, h in panels]))
        if console is not None:
            console.print(f"explained {img.image_path} ({target} p={ex.prob:.2f})",
                          highlight=False)
    for study_id, sheet in sheets.items():
        atomic_write_bytes(join(out, f"studies/{_slug(study_id)}.png"),
                           contact_sheet(sheet, title=f"{study_id} · {method} · {target}"))
    table = pd.DataFrame(rows)
    atomic_write_parquet(table, join(out, "explanations.parquet"))
    return table
