"""Experiment files, their schemas: the one place that says what each output file holds.

Stages hand off through files (nnU-Net style), so each table below is a contract: every column
has one Arrow type, whatever the run (a column whose values are all missing keeps its type; it
never becomes Arrow ``null`` and then changes type once a trial fails). The writers
(:func:`raysearch.experiment.write_results`, :func:`raysearch.ensemble.run_ensemble`) write
through :func:`arrow_schema`, which refuses a column that is not listed here, and
``docs/SCHEMAS.md`` is rendered from these tables (:func:`render_markdown`; a test keeps it
current). A name with ``<...>`` is a pattern: one column per group, label or member.

Readers accept the files of earlier releases: :func:`normalize_members` renames the old
``checkpoint`` column of ``members.parquet`` to ``best_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import pyarrow as pa

__all__ = [
    "ENSEMBLE_JSON",
    "FILES",
    "Column",
    "FileSchema",
    "arrow_schema",
    "conform",
    "normalize_members",
    "render_markdown",
    "unix_seconds",
    "write_parquet",
]

F64, I64, STR, BOOL = pa.float64(), pa.int64(), pa.string(), pa.bool_()
TIMESTAMP = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class Column:
    """One column: ``name`` (or a pattern such as ``val_kappa_<group>``), its Arrow type, and
    what it holds (units, when it is missing)."""

    name: str
    type: pa.DataType
    doc: str

    def matches(self, name: str, *, group: str | None = None) -> bool:
        """Whether ``name`` is this column: equal, or of its pattern. ``<group>`` stands for the
        task's group column (``group``, e.g. body_part) when alone, and for a group's value
        inside a longer name (``val_kappa_<group>``: ``val_kappa_ELBOW``)."""
        if self.name == "<group>":
            return group is not None and name == group
        if "<" not in self.name:
            return name == self.name
        parts = re.split(r"<[^>]+>", self.name)
        return re.fullmatch(".+".join(re.escape(p) for p in parts), name) is not None


@dataclass(frozen=True)
class FileSchema:
    """A file's columns, in the order they are written; ``config`` adds every
    :class:`~raysearch.config.TrialConfig` field after them (the trial's resolved config)."""

    file: str
    doc: str
    columns: tuple[Column, ...]
    config: bool = False

    def all_columns(self) -> tuple[Column, ...]:
        return self.columns + (config_columns() if self.config else ())

    def column(self, name: str, *, group: str | None = None) -> Column | None:
        """The column ``name`` is (exactly first, then by a pattern), or None."""
        cols = self.all_columns()
        for c in cols:
            if c.name == name:
                return c
        for c in cols:
            if c.matches(name, group=group):
                return c
        return None


def _annotation_type(annotation: str) -> pa.DataType:
    base = annotation.replace(" | None", "").strip()
    return {"str": STR, "int": I64, "float": F64, "bool": BOOL}[base]


def config_columns() -> tuple[Column, ...]:
    """Every TrialConfig field as a column (``None`` values are nulls of the field's type)."""
    from raysearch.config import TrialConfig

    return tuple(
        Column(f.name, _annotation_type(str(f.type)), "trial config (TrialConfig)")
        for f in dataclasses.fields(TrialConfig)
    )


def arrow_schema(schema: FileSchema, names: list[str], *, group: str | None = None) -> pa.Schema:
    """The Arrow schema for a frame with columns ``names`` written as ``schema.file``;
    ``group`` is the task's group column (MURA: body_part) where the file has one.

    Raises ``ValueError`` naming a column the schema does not list (a writer bug: add it to this
    module and to the docs, or do not write it).
    """
    fields = []
    for name in names:
        col = schema.column(name, group=group)
        if col is None:
            raise ValueError(f"{schema.file}: column {name!r} is not in raysearch.experiment.schema")
        fields.append(pa.field(name, col.type))
    return pa.schema(fields)


def conform(df, schema: FileSchema, *, group: str | None = None, required: bool = True):
    """``df`` ready to write as ``schema.file``, and the Arrow schema to write it with.

    With ``required``, every fixed column (no pattern, not ``label_name``) is there, a missing
    one as nulls; timestamp columns given as Unix seconds become timestamps.
    """
    import pandas as pd

    out = df.copy()
    if required:
        for col in schema.all_columns():
            if "<" not in col.name and col.name != "label_name" and col.name not in out:
                out[col.name] = pd.Series([None] * len(out), dtype=object)
    for col in schema.all_columns():
        if col.name in out and pa.types.is_timestamp(col.type):
            values = out[col.name]
            if not pd.api.types.is_datetime64_any_dtype(values):
                values = pd.to_datetime(values, unit="s", utc=True)  # time.time() seconds
            # whole microseconds, the column's unit (time.time() carries sub-µs float noise)
            out[col.name] = pd.to_datetime(values, utc=True).dt.floor("us").astype(
                "datetime64[us, UTC]")
    return out, arrow_schema(schema, list(out.columns), group=group)


def write_parquet(df, uri: str, schema: FileSchema, *, group: str | None = None) -> str:
    """Write ``df`` atomically as ``schema.file`` at ``uri``, every column with its listed
    Arrow type (:func:`conform`); returns ``uri``."""
    from raysearch.storage import atomic_write_parquet

    out, arrow = conform(df, schema, group=group)
    return atomic_write_parquet(out, uri, schema=arrow)


def unix_seconds(values):
    """``reported_at`` values as Unix seconds (a float array), from a timestamp column (this
    release) or the float seconds earlier releases wrote."""
    import numpy as np
    import pandas as pd

    s = pd.Series(values)
    if isinstance(s.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_any_dtype(s):
        s = pd.to_datetime(s, utc=True)
        return ((s - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(float)
    return np.asarray(s, dtype=float)


def normalize_members(df):
    """``members.parquet`` as this release writes it, from any release's file: the checkpoint
    column was ``checkpoint`` before it took the name ``best_checkpoint`` of trials.parquet."""
    if "best_checkpoint" not in df and "checkpoint" in df:
        df = df.rename(columns={"checkpoint": "best_checkpoint"})
    return df


# ----------------------------------------------------------------------------- the files

_TRIAL_RESULT = (
    Column("trial_id", STR, "Ray Tune's trial id (``single`` for ``raysearch train``)"),
    Column("status", STR, "completed | early_stopped | pruned | failed | unfinished | pending"),
    Column("epochs", I64, "epochs the trial finished (its final recorded result)"),
    Column("best_val_loss", F64, "lowest val loss over its epochs; NaN without an epoch"),
    Column("best_epoch", I64, "the epoch of best_val_loss (0 without an epoch)"),
    Column("val_study_kappa", F64, "val study Cohen's kappa at best_epoch"),
    Column("best_checkpoint", STR,
           "the checkpoint of best_epoch, relative to the experiment folder; null without one"),
)  # fmt: skip

TRIALS = FileSchema(
    "trials.parquet",
    "One row per trial, lowest best_val_loss first (ties by trial_id); written by `tune` and `train` after the run "
    "(its presence means the results are complete).",
    _TRIAL_RESULT + (
        Column("wall_time_s", F64, "seconds the trial ran (Tune's time_total_s)"),
        Column("error", STR, "the last line of a failed trial's error; null otherwise"),
        Column("val_auc_<label>", F64, "tasks of K > 1 labels: the label's val image AUC at "
               "best_epoch"),
        Column("cv_folds", I64, "`raysearch refit`: folds the configuration was refit on; "
               "null for a configuration not refit"),
        Column("cv_val_loss_mean", F64, "refit: mean over folds of the out-of-fold val loss"),
        Column("cv_val_loss_sd", F64, "refit: its standard deviation over folds (ddof 1)"),
        Column("cv_val_study_kappa_mean", F64,
               "refit: mean over folds of the out-of-fold study kappa"),
        Column("cv_val_study_kappa_sd", F64, "refit: its standard deviation over folds (ddof 1)"),
    ),
    config=True,
)

FOLDS = FileSchema(
    "folds.parquet",
    "`raysearch refit`: the patient-grouped, stratified folds of the training patients (train "
    "and val splits; test is never in a fold), written once and reused by every later refit.",
    (
        Column("patient_id", STR, "a training patient"),
        Column("fold", I64, "its fold, 0..k-1: the refit of fold f validates on these patients"),
    ),
)

REFITS = FileSchema(
    "refit/refits.parquet",
    "`raysearch refit`: one row per (configuration, fold) refit, at its final epoch.",
    (
        Column("trial_id", STR, "the search trial whose configuration was refit"),
        Column("fold", I64, "the fold held out (folds.parquet)"),
        Column("epochs", I64, "epochs trained: the trial's best epoch in the search"),
        Column("val_loss", F64, "loss on the held-out fold (image level)"),
        Column("val_study_kappa", F64, "study kappa on the held-out fold"),
        Column("seconds", F64, "training and validation time of the run's epochs"),
        Column("checkpoint", STR, "the final checkpoint, relative to the experiment folder"),
    ),
)

OOF_PREDICTIONS = FileSchema(
    "refit/oof_predictions.parquet",
    "`raysearch refit`: out-of-fold probabilities, every training image exactly once per "
    "configuration (from the refit that held its patient out).",
    (
        Column("trial_id", STR, "the configuration (a search trial)"),
        Column("fold", I64, "the fold the image was held out in"),
        Column("image_path", STR, "the image"),
        Column("label", I64, "the target (K = 1)"),
        Column("label_<name>", F64, "a label's target (K > 1; NaN where masked)"),
        Column("prob", F64, "the out-of-fold probability (K = 1)"),
        Column("prob_<name>", F64, "a label's out-of-fold probability (K > 1)"),
    ),
)

EPOCHS = FileSchema(
    "epochs.parquet",
    "One row per trial and epoch, from the trial's latest checkpoint (history.json), in "
    "reporting order (reported_at, then trial_id and epoch).",
    (
        Column("trial_id", STR, "the trial (trials.parquet)"),
        Column("epoch", I64, "1-based epoch"),
        Column("train_loss", F64, "mean training loss of the epoch"),
        Column("val_loss", F64, "validation loss (image level)"),
        Column("best_val_loss", F64, "lowest val_loss up to this epoch"),
        Column("val_auc", F64, "validation image AUC (mean over labels)"),
        Column("val_study_accuracy", F64, "validation study accuracy at the task's threshold"),
        Column("val_study_kappa", F64, "validation study Cohen's kappa"),
        Column("lr", F64, "learning rate at the end of the epoch"),
        Column("epoch_time_s", F64, "seconds of training in the epoch"),
        Column("val_time_s", F64, "seconds of validation (precise BN included)"),
        Column("train_images_per_s", F64, "training throughput over all workers"),
        Column("checkpoint_write_s", F64, "seconds to write the epoch's checkpoint locally"),
        Column("reported_at", TIMESTAMP, "when the epoch was reported (UTC)"),
        Column("node_id", STR, "Ray node id of the trial's rank-0 worker"),
        Column("val_kappa_<group>", F64, "validation study kappa of one group (body part)"),
        Column("val_auc_<group>", F64, "validation image AUC of one group or label"),
    ),
)

MEMBERS = FileSchema(
    "ensemble/members.parquet",
    "One row per ensemble member, in member order; the trial columns are trials.parquet's.",
    (
        Column("rank", I64, "1-based member order"),
        Column("trial_id", STR, "the member's trial"),
        Column("weight", F64, "its weight in the ensemble mean (weights sum to 1)"),
        Column("picks", I64, "times greedy selection picked it (1 for top-k)"),
        Column("best_val_loss", F64, "as trials.parquet"),
        Column("best_epoch", I64, "as trials.parquet"),
        Column("status", STR, "as trials.parquet"),
        Column("val_study_kappa", F64, "as trials.parquet"),
        Column("val_study_log_loss", F64, "its study-level log loss on val (selection set; "
               "K > 1 labels: the mean over labels of each label's log loss)"),
        Column("best_checkpoint", STR,
               "full URI of the member's checkpoint (called checkpoint before release 0.3)"),
    ),
    config=True,
)

_PREDICTION = (
    Column("study_id", STR, "the study"),
    Column("patient_id", STR, "its patient"),
    Column("<group>", STR, "the task's group column (MURA: body_part)"),
    Column("split", STR, "test | val (or oof: `ensemble --oof`, every training image)"),
    Column("label_name", STR, "the label of this row (tasks of K > 1 labels only)"),
    Column("label", I64, "the target (0/1)"),
    Column("prob", F64, "the ensemble's probability"),
    Column("pred", I64, "prob > the task's threshold"),
    Column("prob_<trial_id>", F64, "one member's probability"),
)

STUDY_PREDICTIONS = FileSchema(
    "ensemble/study_predictions.parquet",
    "One row per study (and label), test then val.",
    _PREDICTION[:4] + (Column("n_images", I64, "images of the study"),) + _PREDICTION[4:],
)

IMAGE_PREDICTIONS = FileSchema(
    "ensemble/image_predictions.parquet",
    "One row per image (and label), test then val.",
    (Column("image_path", STR, "the image (path or URL)"),) + _PREDICTION,
)

CATEGORY_METRICS = FileSchema(
    "ensemble/category_metrics.parquet",
    "Study-level metrics per model, split and group (then ALL), with bootstrap kappa intervals.",
    (
        Column("model", STR, "ensemble, or a member's trial id"),
        Column("split", STR, "test | val (or oof: `ensemble --oof`, every training image)"),
        Column("label_name", STR, "the label (tasks of K > 1 labels only)"),
        Column("<group>", STR, "a group (MURA: body_part), then ALL"),
        Column("n_studies", I64, "studies in the cell"),
        Column("accuracy", F64, "study accuracy"),
        Column("kappa", F64, "Cohen's kappa"),
        Column("kappa_low", F64, "kappa's 95% bootstrap interval, low end (by patient)"),
        Column("kappa_high", F64, "its high end"),
        Column("sensitivity", F64, "true positive rate"),
        Column("specificity", F64, "true negative rate"),
        Column("auc", F64, "study AUC"),
        Column("tp", I64, "true positives"),
        Column("fp", I64, "false positives"),
        Column("tn", I64, "true negatives"),
        Column("fn", I64, "false negatives"),
        Column("image_auc", F64, "image-level AUC"),
    ),
)

_CI = "95% patient-bootstrap interval"

LABEL_METRICS = FileSchema(
    "ensemble/label_metrics.parquet",
    "Per model (the ensemble and its best single member), split, label and group (then ALL): "
    "ranking metrics of the study probabilities, masked labels left out.",
    (
        Column("model", STR, "ensemble, or the best single member's trial id"),
        Column("split", STR, "test | val"),
        Column("label_name", STR, "the label"),
        Column("<group>", STR, "a group (MURA: body_part), then ALL"),
        Column("n_studies", I64, "studies with this label known"),
        Column("n_patients", I64, "their patients (the bootstrap's units)"),
        Column("n_positive", I64, "positive studies"),
        Column("auc", F64, "ROC AUC (scikit-learn); nan with one class"),
        Column("auc_low", F64, f"its {_CI}, low end"),
        Column("auc_high", F64, "its high end"),
        Column("ap", F64, "average precision (PR AUC, scikit-learn); nan without positives"),
        Column("ap_low", F64, f"its {_CI}, low end"),
        Column("ap_high", F64, "its high end"),
    ),
)

THRESHOLD_METRICS = FileSchema(
    "ensemble/threshold_metrics.parquet",
    "Per model, split, label and group: precision, recall and F1 at source report 3's "
    "thresholds (0.4 to 0.8) and at the threshold chosen on val for the target sensitivity.",
    (
        Column("model", STR, "as label_metrics.parquet"),
        Column("split", STR, "test | val"),
        Column("label_name", STR, "the label"),
        Column("<group>", STR, "a group, then ALL"),
        Column("rule", STR, "fixed | val_sensitivity (chosen on the model's val studies)"),
        Column("threshold", F64, "positive when prob > threshold; nan when no threshold "
               "reached the target on val"),
        Column("n_studies", I64, "studies with this label known"),
        Column("tp", I64, "true positives"),
        Column("fp", I64, "false positives"),
        Column("tn", I64, "true negatives"),
        Column("fn", I64, "false negatives"),
        Column("precision", F64, "scikit-learn; nan without predicted positives"),
        Column("precision_low", F64, f"its {_CI}, low end"),
        Column("precision_high", F64, "its high end"),
        Column("recall", F64, "sensitivity; nan without positives"),
        Column("recall_low", F64, f"its {_CI}, low end"),
        Column("recall_high", F64, "its high end"),
        Column("f1", F64, "F1"),
        Column("f1_low", F64, f"its {_CI}, low end"),
        Column("f1_high", F64, "its high end"),
        Column("specificity", F64, "true negative rate"),
    ),
)

WORKLIST = FileSchema(
    "ensemble/worklist.parquet",
    "The test studies, most likely abnormal first (raysearch.evaluation.triage).",
    (
        Column("rank", I64, "1 = read first"),
        Column("study_id", STR, "the study"),
        Column("patient_id", STR, "its patient"),
        Column("<group>", STR, "the task's group column"),
        Column("p_any", F64, "P(any finding): the task's Sick (any_finding) label, else the max (or "
               "noisy-or) over finding labels (ensemble.json's worklist_rule)"),
        Column("abnormal", I64, "1 when a finding label is known positive, 0 when all known "
               "are negative, null when every finding label is masked"),
        Column("n_findings", I64, "finding labels known positive"),
        Column("top_label", STR, "the most likely finding"),
        Column("top_prob", F64, "its probability"),
    ),
)

TRIAGE = FileSchema(
    "ensemble/triage.parquet",
    "Abnormal test studies in the first 10/20/50% of the worklist against a random order.",
    (
        Column("fraction", F64, "share of the list read"),
        Column("n_studies", I64, "studies whose abnormality is known"),
        Column("n_abnormal", I64, "abnormal studies among them"),
        Column("n_top", I64, "studies in the first fraction (ceil(fraction * n_studies))"),
        Column("found", I64, "abnormal studies among those"),
        Column("expected_random", F64, "abnormal studies a random order puts there on average"),
        Column("captured", F64, "found / n_abnormal"),
        Column("captured_low", F64, f"its {_CI}, low end"),
        Column("captured_high", F64, "its high end"),
        Column("random_captured", F64, "what a random order captures on average (n_top / n)"),
        Column("lift", F64, "captured / random_captured"),
        Column("lift_low", F64, f"its {_CI}, low end"),
        Column("lift_high", F64, "its high end"),
    ),
)

_SIDE = (("n_studies", I64, "studies with the label known"), ("n_positive", I64, "positives"),
         ("auc", F64, "ROC AUC"), ("auc_low", F64, f"its {_CI}, low end"),
         ("auc_high", F64, "its high end"), ("ap", F64, "average precision"),
         ("ap_low", F64, f"its {_CI}, low end"), ("ap_high", F64, "its high end"))

CROSS_DATASET = FileSchema(
    "ensemble/cross_dataset.parquet",
    "`raysearch ensemble --test-data ROOT`: per label, the ensemble on its own test split (home) "
    "and on every image of another dataset (other), through the label mapping "
    "(raysearch.evaluation.crossdataset).",
    (
        Column("other_format", STR, "the other dataset's format (e.g. nih)"),
        Column("label_name", STR, "the home label (null for a label only the other has)"),
        Column("other_label_name", STR, "its partner in the other dataset (null if none)"),
        Column("status", STR, "shared | home only | other only"),
        *(Column(f"home_{n}", t, f"home test: {d}") for n, t, d in _SIDE),
        *(Column(f"other_{n}", t, f"other dataset: {d}") for n, t, d in _SIDE),
    ),
)

FILES = (TRIALS, EPOCHS, MEMBERS, STUDY_PREDICTIONS, IMAGE_PREDICTIONS, CATEGORY_METRICS,
         LABEL_METRICS, THRESHOLD_METRICS, WORKLIST, TRIAGE, CROSS_DATASET, FOLDS, REFITS,
         OOF_PREDICTIONS)

# ensemble/ensemble.json, written last by `raysearch ensemble` (its presence marks a complete
# run): key -> (JSON type, or types joined by " or ", and meaning). The ensemble tests check
# each written file's keys and value types against it (tests/test_schema.py).
ENSEMBLE_JSON = {
    "experiment": ("string", "the experiment folder or URL the ensemble was built from"),
    "method": ("string", "top | greedy"),
    "top": ("integer", "--top: members (top) or selection rounds (greedy)"),
    "tta": ("boolean", "test-time augmentation (horizontal flip) on"),
    "n_boot": ("integer", "bootstrap replicates of the kappa intervals"),
    "seed": ("integer", "bootstrap seed"),
    "device": ("string", "cpu | cuda: where the members were scored"),
    "weights": ("object", "trial id -> member weight (as members.parquet's weight)"),
    "task": ("object", "the task (labels, group, groups, aggregation, maskable, threshold)"),
    "n_test_studies": ("integer", "test studies scored"),
    "threshold": ("number or object", "the decision threshold that predict and serve use, "
                  + "chosen on val studies (one label: a number; several: label -> number)"),
    "threshold_rule": ("string", "how it was chosen: max Cohen's kappa on val studies"),
    "selection": ("string", ("val: members chosen on the val split; oof: on the out-of-fold "
                             "predictions of `raysearch refit` (`ensemble --oof`), each member "
                             "then the mean of its fold models")),
    "folds": ("integer or null", "--oof: the folds of each member (null otherwise)"),
    "selection_path": ("array", ("how the selection set's study log loss moved with each "
                                 "member added: {round, added (trial id), val_study_log_loss} "
                                 "per round (greedy: its picks in order; top: rank order)")),
    "target_sensitivity": ("number", "the sensitivity the val_sensitivity thresholds of "
                           + "threshold_metrics.parquet reach on val"),
    "worklist_rule": ("string", "how worklist.parquet's p_any is computed: any_finding (the "
                      + "task's Sick label), max or noisy_or over the finding labels"),
    "test_data": ("string or null", "--test-data: the other dataset of the cross-dataset test"),
    "test_format": ("string or null", "its format (--format)"),
}


def _type_name(t: pa.DataType) -> str:
    return "timestamp (UTC, µs)" if pa.types.is_timestamp(t) else str(t)


def _md(text: str) -> str:
    return text.replace("``", "`").replace("|", "\\|")


def render_markdown() -> str:
    """``docs/SCHEMAS.md``: every file's columns, types and meanings, from the tables above."""
    lines = [
        "# Output schemas",
        "",
        ("Generated from `raysearch/experiment/schema.py` (`python -m raysearch.experiment.schema "
         "> docs/SCHEMAS.md`); a test checks that the files a run writes match it. Every column "
         "has one Arrow type in every run; a missing value is a null of that type. `<...>` "
         "names a pattern: one column per group, label or member."),
        "",
    ]
    for f in FILES:
        lines += [f"## `{f.file}`", "", f.doc, "", "| column | type | meaning |",
                  "|---|---|---|"]  # fmt: skip
        lines += [f"| `{c.name}` | {_type_name(c.type)} | {_md(c.doc)} |" for c in f.columns]
        if f.config:
            lines.append("| every `TrialConfig` field | its type (string, int64, double) | "
                         "the trial's resolved config: " + ", ".join(
                             f"`{c.name}`" for c in config_columns()) + " |")  # fmt: skip
        lines.append("")
    lines += ["## `ensemble/ensemble.json`", "",
              "Written last by `raysearch ensemble`: its presence marks a complete run.", "",
              "| key | JSON type | meaning |", "|---|---|---|"]  # fmt: skip
    lines += [f"| `{k}` | {t} | {_md(d)} |" for k, (t, d) in ENSEMBLE_JSON.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
