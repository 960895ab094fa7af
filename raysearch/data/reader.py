"""Data stage, what the readers with several labels (chexpert, nih, csv) share: one file listing
to find missing images, one error line for every problem, the label policies, the patient split
and the task.

A reader hands :func:`finish` a frame with one row per image and the columns ``image_path``,
``rel`` (path below the root, for the file check), ``official_split`` (``train``, or ``test``
for an official test set, or ``val``), ``patient_id``, ``study_id``, the task's group column,
and ``raw_<slug>`` per raw label (codes 1, 0, -1, NaN; see :mod:`raysearch.data.labels`).
:func:`finish` returns the manifest: those columns, ``split`` (train/val/test) and the targets
(``label_<slug>`` for K > 1; ``label`` int 0/1 for K = 1, rows whose single label is masked
left out and counted), sorted by (split, study_id, image_path). ``manifest.attrs`` carries
``"skipped"`` (as MURA's), ``"policy"`` (the Rich policy table), ``"steps"`` (images kept after
each step) and ``"split_note"`` (how the split was made, in words).
"""

from __future__ import annotations

from collections import defaultdict

import pandas as pd

from raysearch import storage
from raysearch.data.dataset import Task, slug
from raysearch.data.labels import LabelPolicy, apply_policy, choose_labels, policy_table
from raysearch.data.split import split_by_fractions
from raysearch.errors import DataError, name_some, os_reason

__all__ = ["Problems", "finish", "list_files", "read_csv_text"]

DEFAULT_TEST_FRACTION = 0.2  # when a dataset has no official test set and none is asked for


def read_csv_text(source: str | bytes, *, name: str) -> pd.DataFrame:
    """A label CSV (``source``: its path or URL, or its bytes; gzip-compressed or not) as a
    table of strings, blanks kept as ``""``. Raises DataError naming ``name`` for a file that
    cannot be read or parsed."""
    import io

    if isinstance(source, bytes):
        raw = source
    else:
        try:
            raw = storage.read_bytes(source)
        except OSError as e:
            raise DataError(f"cannot read {source}: {os_reason(e)}") from None
    try:
        return pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False,
                           compression="gzip" if raw[:2] == b"\x1f\x8b" else None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"cannot parse {name}: {str(e).splitlines()[0]}") from None


def list_files(root: str) -> set[str]:
    """Paths below ``root`` (relative, '/'-separated) of every file, from one recursive listing."""
    fs, root_path = storage.get_fs(root)
    root_path = root_path.rstrip("/")
    prefix = root_path + "/"
    out = set()
    for path in fs.find(root_path):
        path = path if path.startswith(prefix) else fs._strip_protocol(path)
        if path.startswith(prefix):
            out.add(path[len(prefix):])
    return out


class Problems:
    """What is wrong with a dataset: (thing, reason, entry) records, reported as one line."""

    def __init__(self, what: str, root: str) -> None:
        self.what, self.root = what, root
        self.records: list[tuple[str, str, str]] = []

    def add(self, things, reason: str, *, entry: str = "image") -> None:
        for thing in things:
            self.records.append((str(thing), reason, entry))

    def raise_unless(self, skip_bad: bool) -> None:
        """One DataError line naming every kind of problem and some of its things."""
        if not self.records or skip_bad:
            return
        by_reason: dict[str, list[str]] = defaultdict(list)
        for thing, reason, _ in self.records:
            by_reason[reason].append(thing)
        parts = [f"{r} ({len(t)}): {name_some(t)}" for r, t in by_reason.items()]
        n = len(self.records)
        raise DataError(
            f"{n} problem{'s' if n != 1 else ''} in the {self.what} data at {self.root} — "
            f"{'; '.join(parts)}. Fix them, or leave them out: data.skip_bad: true in the space "
            "or trial file (raysearch data --skip-bad)."
        )

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.records, columns=["path", "reason", "entry"])


def check_missing(frame: pd.DataFrame, files: set[str], problems: Problems) -> pd.DataFrame:
    """Rows whose ``rel`` is not a file go to ``problems`` (missing image); the rest return."""
    missing = ~frame["rel"].isin(files)
    problems.add(frame.loc[missing, "rel"], "image listed but missing")
    return frame.loc[~missing].reset_index(drop=True)


def check_studies_agree(frame: pd.DataFrame, columns: list[str], problems: Problems, *,
                        reason: str) -> pd.DataFrame:
    """Every image of a study must carry the same values of ``columns`` (NaN equals NaN);
    the studies that do not go to ``problems`` (entry ``study``) with all their images."""
    if frame.empty:
        return frame
    # As text, so that NaN equals NaN and 1.0 differs from -1.0.
    filled = frame[columns].astype(str).assign(study_id=frame["study_id"])
    bad = filled.groupby("study_id", sort=False)[columns].nunique(dropna=False).gt(1).any(axis=1)
    bad_studies = bad.index[bad.to_numpy()]
    if len(bad_studies):
        problems.add(bad_studies, reason, entry="study")
        return frame.loc[~frame["study_id"].isin(set(bad_studies))].reset_index(drop=True)
    return frame


def finish(frame: pd.DataFrame, data, *, available: tuple[str, ...], name: str, group: str,
           groups: tuple[str, ...], aggregation: str, problems: Problems,
           competition: tuple[str, ...] = (), has_official_test: bool) -> tuple[pd.DataFrame, Task]:
    """Labels, policies, split and task of a reader's frame (see the module docstring).

    ``available``: the raw labels (one ``raw_<slug>`` column each). ``has_official_test``: the
    frame's ``official_split`` marks an official test set (kept as test unless
    ``data.test_fraction`` is given, which then splits all patients and drops the official test
    rows, as source report 3 split CheXpert's train.csv alone).
    """
    # A wrong option is told before the data's problems: it is the quicker fix.
    labels = choose_labels(available, data.labels, competition=competition, what=name)
    problems.raise_unless(data.skip_bad)
    if frame.empty:
        raise DataError(f"no usable images in the {name} data at {problems.root}")
    policy = LabelPolicy.from_data(data)
    # The split comes first, so that every policy sees the same patients in each split.
    frame, note = _split(frame, data, has_official_test=has_official_test)
    kept, names, steps = apply_policy(frame, labels, policy, findings=available)
    if kept.empty:
        raise DataError(f"no images left in the {name} data after the label policy {policy!r}")
    cols = [f"label_{slug(n)}" for n in names]
    maskable = tuple(n for n, c in zip(names, cols) if kept[c].isna().any())
    if len(names) == 1:  # the K = 1 contract: `label`, int 0/1
        known = kept[cols[0]].notna()
        if not known.all():
            steps["single label masked, dropped"] = int((~known).sum())
            kept = kept.loc[known].reset_index(drop=True)
            steps["kept"] = len(kept)
        kept = kept.rename(columns={cols[0]: "label"})
        kept["label"] = kept["label"].astype("int64")
        maskable = ()
    if kept.empty:
        raise DataError(f"no images left in the {name} data after the label policy {policy!r}")
    task = Task(name=name, labels=tuple(names), group=group, groups=groups,
                aggregation=data.aggregation or aggregation, maskable=maskable)
    missing_splits = [s for s in ("train", "val") if not (kept["split"] == s).any()]
    if missing_splits:
        raise DataError(f"the {name} data has no {' or '.join(missing_splits)} images after the "
                        f"split ({note}); use more data or other fractions")
    order = {"train": 0, "val": 1, "test": 2}
    kept = kept.assign(_o=kept["split"].map(order)).sort_values(
        ["_o", "study_id", "image_path"], kind="stable").drop(columns=["_o", "rel"])
    kept = kept.reset_index(drop=True)
    kept.attrs["skipped"] = problems.frame()
    kept.attrs["steps"] = steps
    kept.attrs["split_note"] = note
    shown = kept.rename(columns={"label": cols[0]}) if task.k == 1 else kept
    kept.attrs["policy"] = policy_table(frame, shown, names, steps=steps, policy=policy,
                                        title=f"{name} labels")
    return kept, task


def _split(frame: pd.DataFrame, data, *, has_official_test: bool) -> tuple[pd.DataFrame, str]:
    official = frame["official_split"]
    if data.test_fraction is not None or not has_official_test:
        test_fraction = data.test_fraction
        if test_fraction is None:
            test_fraction = DEFAULT_TEST_FRACTION
        if has_official_test:  # the fractions split the official train set alone
            frame = frame.loc[official != "test"].reset_index(drop=True)
        assignment = split_by_fractions(frame["patient_id"], val_fraction=data.val_fraction,
                                        test_fraction=test_fraction, seed=data.seed)
        frame = frame.assign(split=frame["patient_id"].astype(str).map(assignment))
        return frame, (f"patients split train/val/test {1 - data.val_fraction - test_fraction:.2g}"
                       f"/{data.val_fraction:g}/{test_fraction:g}, seed {data.seed}")
    has_val = (official == "val").any()
    split = official.where(official.isin(["test", "val"]), "train").to_numpy(object)
    if not has_val:
        train = official == "train"
        assignment = split_by_fractions(frame.loc[train, "patient_id"],
                                        val_fraction=data.val_fraction, seed=data.seed)
        split[train.to_numpy()] = frame.loc[train, "patient_id"].astype(str).map(assignment)
        note = (f"official test; val_fraction {data.val_fraction:g} of the other patients, "
                f"seed {data.seed}")
    else:
        note = "official train/val/test"
    return frame.assign(split=split), note


def check_patients_in_one_split(frame: pd.DataFrame, column: str, *, where: str) -> None:
    """A patient in two splits leaks test into training: DataError naming some of them."""
    n = frame.groupby("patient_id")[column].nunique()
    both = sorted(map(str, n.index[n.to_numpy() > 1]))
    if both:
        raise DataError(f"{len(both)} patient(s) appear in more than one split of {where} "
                        f"(leakage): {name_some(both)}")


def summary_table(manifest: pd.DataFrame, task: Task, *, title: str | None = None):
    """A Rich table of a manifest of a reader with several labels: per split and group, the
    patients, studies and images, and per label the positive studies (after the policy; a
    study is positive when any of its images is, as the max aggregation scores it)."""
    from rich.table import Table

    table = Table(title=title or f"{task.name} manifest")
    table.add_column("split")
    table.add_column(task.group)
    for name in ("patients", "studies", "images"):
        table.add_column(name, justify="right")
    splits = [s for s in ("train", "val", "test") if (manifest["split"] == s).any()]
    for split in [*splits, "all"]:
        part = manifest if split == "all" else manifest[manifest["split"] == split]
        groups = [g for g in [*task.groups, *sorted(set(part[task.group]) - set(task.groups))]
                  if (part[task.group] == g).any()]
        for g in groups if split != "all" else []:
            sub = part[part[task.group] == g]
            table.add_row("", str(g), f"{sub['patient_id'].nunique():,}",
                          f"{sub['study_id'].nunique():,}", f"{len(sub):,}")
        table.add_row(split, "ALL", f"{part['patient_id'].nunique():,}",
                      f"{part['study_id'].nunique():,}", f"{len(part):,}", style="bold",
                      end_section=True)
    return table
