"""Data stage, the split: which patients train and which validate. A patient's images all land
on one side, so the validation set never sees a patient the model trained on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from raysearch.errors import ConfigError, DataError, name_some

__all__ = ["patient_folds", "split_by_fractions", "split_patients"]


def split_patients(
    studies_or_images: pd.DataFrame, *, val_fraction: float, seed: int
) -> dict[str, str]:
    """Assign every patient to "train" or "val"; returns patient_id -> split.

    Needs columns patient_id, body_part, label (and study_id, else row order decides a patient's
    first study). A patient's stratum is the body part of their first study plus whether any of
    their studies is abnormal; each stratum sends its share of ``val_fraction`` of the patients
    to "val", with largest-remainder rounding so the total is ``round(val_fraction * patients)``.
    Seeded with ``np.random.default_rng(seed)``; the input's row order does not matter.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    missing = {"patient_id", "body_part", "label"} - set(studies_or_images.columns)
    if missing:
        raise DataError(f"split_patients needs columns {name_some(sorted(missing))}")
    df = studies_or_images
    if "study_id" in df.columns:
        df = df.sort_values(["patient_id", "study_id"], kind="stable")
    per_patient = df.groupby("patient_id", sort=True).agg(
        body_part=("body_part", "first"), abnormal=("label", "max")
    )
    strata = per_patient["body_part"] + "/" + per_patient["abnormal"].astype(str)
    groups = {k: sorted(v) for k, v in strata.groupby(strata).groups.items()}
    keys = sorted(groups)
    rng = np.random.default_rng(seed)

    total = round(val_fraction * len(per_patient))
    exact = np.array([val_fraction * len(groups[k]) for k in keys])
    counts = np.floor(exact).astype(int)
    # Largest remainders get the leftover places; random jitter breaks ties without bias.
    order = np.argsort(-(exact - counts) - 1e-9 * rng.random(len(keys)), kind="stable")
    counts[order[: max(0, total - counts.sum())]] += 1

    assignment = {}
    for key, n_val in zip(keys, counts):
        members = groups[key]
        chosen = set(rng.permutation(len(members))[:n_val].tolist())
        for i, patient in enumerate(members):
            assignment[patient] = "val" if i in chosen else "train"
    return assignment


def patient_folds(images: pd.DataFrame, *, k: int, seed: int, group: str,
                  label_columns: tuple[str, ...] | list[str] = ("label",)) -> pd.DataFrame:
    """Assign every patient of ``images`` to one of ``k`` folds, stratified by group x label.

    ``images``: one row per image with ``patient_id``, ``group`` (e.g. ``body_part``) and the
    task's label columns (NaN = masked). An image's stratum is its group and whether any of its
    labels is positive; scikit-learn's ``StratifiedGroupKFold`` (shuffled, ``random_state=seed``)
    keeps each patient's images in one fold while matching every fold's stratum shares as well as
    the patient grouping allows (the k-fold protocol of nnU-Net, Isensee et al. 2021, with the
    patient grouping of MURA's own split). Returns a frame ``patient_id, fold`` (fold 0..k-1),
    one row per patient, sorted by patient. Raises ConfigError for ``k < 2`` and DataError when
    there are fewer patients than folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if not isinstance(k, (int, np.integer)) or k < 2:
        raise ConfigError(f"--folds must be an integer >= 2, got {k!r}")
    missing = {"patient_id", group, *label_columns} - set(images.columns)
    if missing:
        raise DataError(f"patient_folds needs columns {name_some(sorted(missing))}")
    df = images.sort_values(["patient_id", *(["image_path"] if "image_path" in images else [])],
                            kind="stable").reset_index(drop=True)
    n_patients = df["patient_id"].nunique()
    if n_patients < k:
        raise DataError(f"{k} folds need at least {k} patients; the training data has {n_patients}")
    positive = (df[list(label_columns)].fillna(0).to_numpy() > 0).any(axis=1)
    strata = df[group].astype(str) + "/" + positive.astype(int).astype(str)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.empty(len(df), dtype=np.int64)
    for i, (_, held) in enumerate(splitter.split(np.zeros(len(df)), strata, df["patient_id"])):
        fold[held] = i
    out = pd.DataFrame({"patient_id": df["patient_id"], "fold": fold}).drop_duplicates()
    if out["patient_id"].duplicated().any():  # StratifiedGroupKFold never splits a group
        raise AssertionError("a patient landed in two folds")
    return out.sort_values("patient_id", kind="stable").reset_index(drop=True)


def split_by_fractions(
    patients, *, val_fraction: float, test_fraction: float = 0.0, seed: int
) -> dict[str, str]:
    """Assign every patient to "train", "val" or "test"; returns patient_id -> split.

    For datasets without MURA's strata (chexpert, nih, csv): the sorted unique patients are
    shuffled by ``np.random.default_rng(seed)``; the first ``round(test_fraction * n)`` go to
    test, the next ``round(val_fraction * n)`` to val, the rest to train. The input's order and
    repeats do not matter, so the same patients and seed give the same split.
    """
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0
            and val_fraction + test_fraction < 1.0):
        raise ConfigError(f"fractions must be in [0, 1) and leave patients to train, got "
                          f"val_fraction={val_fraction}, test_fraction={test_fraction}")
    unique = np.array(sorted({str(p) for p in patients}), dtype=object)
    order = np.random.default_rng(seed).permutation(len(unique))
    n_test = round(test_fraction * len(unique))
    n_val = round(val_fraction * len(unique))
    out = {}
    for rank, i in enumerate(order):
        out[unique[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out
