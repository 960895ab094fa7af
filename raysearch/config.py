"""Config: YAML -> validated, frozen dataclasses, and the checks both file formats share.

Two files are read by raysearch:

* a **trial config** (``raysearch train CONFIG.yaml``): one fixed set of hyperparameters, read
  here;
* a **search space** (``raysearch tune SPACE.yaml``), read in :mod:`raysearch.search.space` with the
  same checks and the same :class:`DataConfig` and :class:`ResourcesConfig`.

Validation happens once, at the edge, before Ray starts. Every error names the key path and what
is allowed. Inside Ray, a trial turns its plain dict back into the same :class:`TrialConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Any

import yaml

from raysearch.errors import ConfigError, os_reason
from raysearch.storage import is_url, read_bytes

CLASS_WEIGHTINGS = ("none", "mura", "inverse", "balanced")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("plateau", "cosine")
FINETUNE_MODES = ("full", "head", "gradual")  # raysearch.models.finetune
AUGMENT_KEYS = ("rotation", "hflip", "scale_min", "scale_max", "translate", "brightness", "contrast")

# ----------------------------------------------------------------------------- sane maxima
# Upper bounds on settings where a huge value is a typo that only the machine would refuse, after
# minutes or hours (a cache that fills the disk, workers Ray waits for forever, an epoch that never
# ends). They are generous: each is far past anything a MURA search needs.

# MURA's PNGs are at most 512 px on their long side (CheXpert-small: 320-390 px), and ImageNet-
# pretrained CNNs gain nothing past about 1024 px; the cache and activation memory grow with the
# square of the size (cache.cache_bytes: MURA's 40,005 images take 4.1 GB at 320 px, 42 GB at
# 1024 px and 400 TB at 100000 px).
MAX_IMAGE_SIZE = 1024
MAX_BATCH_SIZE = 4096  # images per step on one worker
MAX_EPOCHS = 1000  # also bounds warm-up and patience, which count epochs
MAX_PRECISE_BN_IMAGES = 100_000  # MURA has 36,808 training images; more only means "all"
MAX_LR = 1.0  # Adam and AdamW diverge long before
MAX_WEIGHT_DECAY = 1.0
MAX_SEED = 2**32 - 1  # numpy's legacy RandomState (inside Optuna's samplers) takes seeds < 2**32
MAX_NUM_SAMPLES = 10_000  # trials in one search
MAX_WORKERS_PER_TRIAL = 128  # DDP ranks of one trial
MAX_GPUS_PER_WORKER = 8  # a worker drives one device; fractions share one
MAX_CPUS_PER_WORKER = 256
MAX_CONCURRENT = 10_000
MAX_FAILURES = 100  # retries of one trial

# fp_bias b is added to the count of negative training images in `inverse`'s positive weight
# 1 + (N + b) / P. It must not be negative (that could make the weight <= 0); MURA has about 22k
# negative training images, so a bias past a million is a typo, not a setting.
MAX_FP_BIAS = 1e6


# Keys that earlier releases wrote into every saved trial config and that are no longer settings:
# fail_at_epoch and fail_mode were test hooks (faults are now injected by the worker's
# RAYSEARCH_FAULTS_FILE, see raysearch.train.worker), never meant for users.
RETIRED_TRIAL_KEYS = ("fail_at_epoch", "fail_mode")


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs to train; travels inside every checkpoint.

    Defaults are the MURA paper's baseline (Rajpurkar et al. 2017): DenseNet-169 from ImageNet,
    320 px, flips and +-30 degree rotations, Adam at 1e-4, batch 8, lr /10 on plateau, weighted BCE.
    """

    arch: str = "densenet169"
    weights: str = "imagenet"
    dropout: float = 0.0
    # Transfer-learning mode (raysearch.models.finetune): full | head | gradual; gradual trains the
    # head alone for `warmup_epochs`, then the backbone too at lr * backbone_lr_mult.
    finetune: str = "full"
    last_n_blocks: int | None = None  # None: the whole backbone; N: only its last N blocks
    backbone_lr_mult: float | None = None  # None: 1.0 for full, 0.1 for gradual
    image_size: int = 320
    batch_size: int = 8
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_schedule: str = "plateau"
    plateau_patience: int = 1
    warmup_epochs: int = 1
    max_epochs: int = 30
    early_stop_patience: int = 5
    # Training images (un-augmented) that re-estimate BatchNorm statistics before each
    # validation ("precise BN", see models.recompute_bn_stats); 0 keeps the running averages.
    precise_bn_images: int = 512
    class_weighting: str = "mura"
    fp_bias: float = 0.0
    augment: str = "mura"
    # Individual augmentation parameters; None means "take it from the preset".
    rotation: float | None = None
    hflip: float | None = None
    scale_min: float | None = None
    scale_max: float | None = None
    translate: float | None = None
    brightness: float | None = None
    contrast: float | None = None
    seed: int = 0
    # Binary relevance (source report 3): one single-logit model per label of the task instead
    # of one model with K outputs (models.PerLabelModels); K times the compute and weights.
    # Last, so that the config columns of earlier releases keep their order.
    binary_relevance: bool = False
    # The uncertainty policy of this trial's training targets (ignore, zeros, ones, drop),
    # re-derived from the manifest's raw label codes; None keeps data.uncertain's. Val and test
    # keep data.uncertain's targets, so that val_loss compares trials of different policies.
    uncertain: str | None = None

    def __post_init__(self) -> None:
        check_choice("arch", self.arch, _architectures())
        if self.uncertain is not None:
            check_choice("uncertain", self.uncertain, UNCERTAIN_POLICIES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("class_weighting", self.class_weighting, CLASS_WEIGHTINGS)
        self._check_finetune()
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}", key="dropout")
        check_range("image_size", self.image_size, 16, MAX_IMAGE_SIZE)
        check_range("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        for name in ("max_epochs", "early_stop_patience", "plateau_patience"):
            check_range(name, getattr(self, name), 1, MAX_EPOCHS)
        check_range("warmup_epochs", self.warmup_epochs, 0, MAX_EPOCHS)
        if self.warmup_epochs > self.max_epochs:  # the learning rate would never reach `lr`
            raise ConfigError(
                "`warmup_epochs <= max_epochs` must hold, but got "
                f"warmup_epochs={self.warmup_epochs!r}, max_epochs={self.max_epochs!r}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}", key="lr")
        check_range("lr", self.lr, 0, MAX_LR)
        check_range("weight_decay", self.weight_decay, 0, MAX_WEIGHT_DECAY)
        if not 0 <= self.fp_bias <= MAX_FP_BIAS:
            raise ConfigError(
                f"fp_bias must be in [0, {MAX_FP_BIAS:g}], got {self.fp_bias!r}", key="fp_bias"
            )
        check_range("precise_bn_images", self.precise_bn_images, 0, MAX_PRECISE_BN_IMAGES)
        check_range("seed", self.seed, 0, MAX_SEED)
        self.augment_params()  # validates the preset and overrides
        if self.weights not in ("none", "imagenet") and not is_url(self.weights):
            # Trials run in another working directory: a relative weights path must be absolute.
            object.__setattr__(self, "weights", os.path.abspath(os.path.expanduser(self.weights)))

    def _check_finetune(self) -> None:
        from raysearch.models.registry import num_blocks

        check_choice("finetune", self.finetune, FINETUNE_MODES)
        if self.finetune != "full" and self.weights == "none":
            raise ConfigError(
                f"finetune: {self.finetune} freezes the backbone, but weights: none leaves it "
                "random; give pretrained weights (imagenet, a file or a URL) or use finetune: full",
                key="finetune",
            )
        if self.last_n_blocks is not None:
            if self.finetune == "head":
                raise ConfigError("last_n_blocks does not apply to finetune: head (only the head "
                                  "trains); use finetune: full or gradual", key="last_n_blocks")
            n = num_blocks(self.arch)
            if not 1 <= self.last_n_blocks <= n:
                raise ConfigError(f"last_n_blocks must be in [1, {n}] ({self.arch} has {n} "
                                  f"blocks), got {self.last_n_blocks!r}", key="last_n_blocks")
        if self.backbone_lr_mult is not None:
            if self.finetune == "head":
                raise ConfigError("backbone_lr_mult does not apply to finetune: head (the "
                                  "backbone never trains); give it only with full or gradual "
                                  "(in a space: `when: {finetune: [full, gradual]}`)",
                                  key="backbone_lr_mult")
            check_range("backbone_lr_mult", self.backbone_lr_mult, 1e-6, 10.0)
        if self.finetune == "gradual" and not 1 <= self.warmup_epochs < self.max_epochs:
            raise ConfigError(
                "finetune: gradual trains the head alone for warmup_epochs epochs, so "
                "`1 <= warmup_epochs < max_epochs` must hold, but got "
                f"warmup_epochs={self.warmup_epochs!r}, max_epochs={self.max_epochs!r}",
                key="warmup_epochs",
            )

    @property
    def backbone_lr_factor(self) -> float:
        """The backbone's learning rate over ``lr``: ``backbone_lr_mult``, or by default 1.0 for
        ``full`` and 0.1 for ``gradual`` (ULMFiT's discriminative rates, arXiv:1801.06146)."""
        if self.backbone_lr_mult is not None:
            return self.backbone_lr_mult
        return 0.1 if self.finetune == "gradual" else 1.0

    def augment_params(self):
        """The resolved :class:`~raysearch.data.augment.AugmentParams`: the preset, then overrides."""
        from raysearch.data.augment_params import PRESETS, resolve_augment

        check_choice("augment", self.augment, tuple(PRESETS))
        overrides = {k: getattr(self, k) for k in AUGMENT_KEYS if getattr(self, k) is not None}
        try:
            return resolve_augment(self.augment, **overrides)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"augment: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, path: str = "") -> TrialConfig:
        """A config from user input (YAML, CLI, a space's sample): unknown keys are refused."""
        return build(cls, data, path=path)

    @classmethod
    def from_saved(cls, data: dict[str, Any], *, path: str = "") -> TrialConfig:
        """A config saved by raysearch (a checkpoint's ``trial.json``, a resumed trial): as
        :meth:`from_dict`, but keys that earlier releases saved and this one retired
        (:data:`RETIRED_TRIAL_KEYS`) are dropped, so that old experiments stay readable."""
        return build(cls, {k: v for k, v in data.items() if k not in RETIRED_TRIAL_KEYS}, path=path)


# Dataset formats (raysearch.data.formats reads each one) and the label options of the formats
# with several labels (raysearch.data.labels applies them). `auto` detects the format from the root.
DATA_FORMATS = ("auto", "mura", "chexpert", "nih", "csv")
VIEWS = ("all", "frontal", "lateral")
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones", "drop")  # CheXpert's U-Ignore, U-Zeros, U-Ones
BLANK_POLICIES = ("zeros", "ignore")
LABEL_SETS = ("all", "competition")


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how to read it (the ``data:`` section of a space or trial file).

    ``format`` picks the reader (``auto``: detected from ``root``; MURA when it looks like MURA).
    MURA uses root, val_fraction, seed, cache_dir and skip_bad; the other options are for the
    formats with several labels (chexpert, nih, csv), see ``raysearch.data.labels``:

    * ``views``: all, frontal or lateral (CheXpert's Frontal/Lateral column);
    * ``labels``: ``all``, ``competition`` (CheXpert's five) or a list of label names;
    * ``uncertain`` (a -1 label): ignore (masked in the loss), zeros, ones, or drop the image;
    * ``blank`` (a label not mentioned): zeros or ignore;
    * ``drop_all_negative``: drop images whose chosen labels are all 0 after the policies;
    * ``any_finding``: add the label "Sick", positive when any finding but Support Devices is;
    * ``test_fraction``: None keeps the official test (CheXpert's valid.csv, NIH's test_list.txt,
      a CSV's split column); a number splits all patients into train/val/test, seeded;
    * ``aggregation``: mean or max of a study's images (default: the format's);
    * the CSV's column names (``*_column``; None: the default names, see
      ``raysearch.data.manifest_csv``).
    """

    root: str = "demo_data"
    val_fraction: float = 0.1
    seed: int = 0
    cache_dir: str | None = None  # default: <storage>/cache
    skip_bad: bool = False
    format: str = "auto"
    views: str = "all"
    labels: str | tuple[str, ...] = "all"
    uncertain: str = "ignore"
    blank: str = "zeros"
    drop_all_negative: bool = False
    any_finding: bool = False
    test_fraction: float | None = None
    aggregation: str | None = None
    path_column: str | None = None
    patient_column: str | None = None
    study_column: str | None = None
    group_column: str | None = None
    split_column: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        check_range("data.seed", self.seed, 0, MAX_SEED)
        check_choice("data.format", self.format, DATA_FORMATS)
        check_choice("data.views", self.views, VIEWS)
        check_choice("data.uncertain", self.uncertain, UNCERTAIN_POLICIES)
        check_choice("data.blank", self.blank, BLANK_POLICIES)
        if self.aggregation is not None:
            check_choice("data.aggregation", self.aggregation, ("mean", "max"))
        labels = self.labels
        if isinstance(labels, list):
            labels = tuple(labels)
            object.__setattr__(self, "labels", labels)
        if isinstance(labels, str):
            if labels not in LABEL_SETS:
                raise ConfigError(f"data.labels: unknown value {labels!r}; allowed: all, "
                                  f"competition, or a list of label names ([{labels}] for this one)")
        elif not (isinstance(labels, tuple) and labels
                  and all(isinstance(x, str) and x.strip() for x in labels)):
            raise ConfigError("data.labels must be all, competition or a non-empty list of "
                              f"label names, got {labels!r}")
        elif len(set(labels)) != len(labels):
            raise ConfigError(f"data.labels: a label is listed twice in {list(labels)}")
        if self.test_fraction is not None:
            if not 0.0 < self.test_fraction < 1.0:
                raise ConfigError(
                    f"data.test_fraction must be in (0, 1), got {self.test_fraction!r}")
            if self.val_fraction + self.test_fraction >= 1.0:
                raise ConfigError(
                    "`data.val_fraction + data.test_fraction < 1` must hold (patients are left "
                    f"to train), but got val_fraction={self.val_fraction!r}, "
                    f"test_fraction={self.test_fraction!r}")
        for name in ("path_column", "patient_column", "study_column", "group_column",
                     "split_column"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise ConfigError(f"data.{name} must be a column name, got {value!r}")

    def reader_options(self) -> list[str]:
        """The options for the formats with several labels that differ from their defaults
        (MURA refuses them rather than ignore them)."""
        shared = {"root", "val_fraction", "seed", "cache_dir", "skip_bad", "format"}
        return [f.name for f in fields(self) if f.name not in shared
                and getattr(self, f.name) != f.default]

    @property
    def label_choice(self) -> str | list[str]:
        """``labels`` as YAML writes it: a word, or a list of names."""
        return self.labels if isinstance(self.labels, str) else list(self.labels)


@dataclass(frozen=True)
class ResourcesConfig:
    workers_per_trial: int = 1
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float | None = None  # None: 1 on CPU-only clusters, else a share of the node
    max_concurrent: int | None = None  # None: derived from the cluster
    max_failures: int = 2  # trial-level retries from the last checkpoint

    def __post_init__(self) -> None:
        check_range("resources.workers_per_trial", self.workers_per_trial, 1, MAX_WORKERS_PER_TRIAL)
        if self.gpus_per_worker is not None:
            check_range("resources.gpus_per_worker", self.gpus_per_worker, 0, MAX_GPUS_PER_WORKER)
        if self.cpus_per_worker is not None and not 0 < self.cpus_per_worker <= MAX_CPUS_PER_WORKER:
            raise ConfigError(
                f"resources.cpus_per_worker must be in (0, {MAX_CPUS_PER_WORKER}], "
                f"got {self.cpus_per_worker!r}"
            )
        if self.max_concurrent is not None:
            check_range("resources.max_concurrent", self.max_concurrent, 1, MAX_CONCURRENT)
        check_range("resources.max_failures", self.max_failures, 0, MAX_FAILURES)


# ----------------------------------------------------------------------------- loading


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file (local path or URL) into a dict; the top level must be a mapping.

    Raises ConfigError for a missing or unreadable file, invalid YAML, a key given twice in one
    mapping (YAML would silently keep the last) or a top level that is not a mapping.
    """
    try:
        raw = read_bytes(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:  # permission denied, a directory, a bucket that refuses us
        raise ConfigError(f"cannot read {path}: {os_reason(e)}") from None
    try:
        data = yaml.load(raw, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except _DuplicateKeyError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.MarkedYAMLError as e:  # a syntax error: where it is, as editors count (from 1)
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = e.problem or str(e).splitlines()[0]
        if e.context:  # e.g. "while parsing a flow mapping", with where that began
            began = e.context_mark
            at = f" at line {began.line + 1}" if began and began is not mark else ""
            what += f" ({e.context}{at})"
        raise ConfigError(f"{path}{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping, naming its path and lines."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_unique_keys(self, node, path="")
        return super().construct_document(node)


def _check_unique_keys(loader: yaml.SafeLoader, node: yaml.Node, *, path: str) -> None:
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(loader, item, path=f"{path}[{i}]")
        return
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[Any, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges, it is not a key
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            continue  # a complex key; none of raysearch's files has one
        key = loader.construct_object(key_node)
        where = f"{path}.{key}" if path else str(key)
        line = key_node.start_mark.line + 1
        if key in first_line:
            raise _DuplicateKeyError(f"duplicate key `{where}` at lines {first_line[key]} and {line}")
        first_line[key] = line
        _check_unique_keys(loader, value_node, path=where)


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
SEARCH_SPACES_DIR = os.path.join(PACKAGE_DIR, "search_spaces")  # shipped search spaces
CONFIGS_DIR = os.path.join(PACKAGE_DIR, "configs")  # shipped trial configs


def packaged(folder: str) -> list[str]:
    """Names (without ``.yaml``) of the files shipped in ``folder`` (SEARCH_SPACES_DIR, ...)."""
    try:
        return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))
    except OSError:
        return []


def resolve_config_path(path: str, folder: str) -> str:
    """``path`` itself when it names a file (or a URL); else the file shipped in ``folder`` that
    it names: ``mura``, ``mura.yaml`` or ``search_spaces/mura.yaml`` from any working directory,
    also one that holds a folder of that name (``raysearch demo-data demo`` writes ``demo/``).
    A path that is neither stays as given, for :func:`load_yaml` to report as not found."""
    if is_url(path) or os.path.isfile(os.path.expanduser(path)):
        return path
    name = os.path.basename(path)
    name = name.removesuffix(".yaml")
    parent = os.path.basename(os.path.dirname(os.path.normpath(path)))
    if name in packaged(folder) and parent in ("", os.path.basename(folder)):
        return os.path.join(folder, f"{name}.yaml")
    return path


def check_config_command(path: str, raw: dict[str, Any] | None, command: str) -> None:
    """Refuse, with the command to use, a file meant for the other command: a search space
    (``space:``) given to ``raysearch train``, a trial config (trial keys such as ``arch`` at the
    top, no ``space``) given to ``raysearch tune``. With ``raw`` None (``path`` not read yet),
    refuse a ``path`` that is no file but names a config shipped for the other command
    (``raysearch train demo``, ``raysearch tune demo_trial``), so that it is not reported as
    merely not found. ``command`` is ``"train"`` or ``"tune"``.

    Raises :class:`ConfigError` naming ``path`` and the right command; returns otherwise."""
    mine, other, folder = (("trial config", "search space", SEARCH_SPACES_DIR)
                           if command == "train" else
                           ("search space", "trial config", CONFIGS_DIR))
    other_command = "tune" if command == "train" else "train"
    if raw is None:
        name = os.path.basename(os.path.normpath(path)).removesuffix(".yaml")
        if (not is_url(path) and not os.path.isfile(os.path.expanduser(path))
                and name in packaged(folder)):
            raise ConfigError(f"config file not found: {path}; `{name}` is a shipped {other}: "
                              f"run it with `raysearch {other_command} {name}`")
        return
    if command == "train":
        wrong = "space" in raw
    else:
        trial_keys = {f.name for f in fields(TrialConfig)}
        wrong = "space" not in raw and bool(trial_keys & set(raw))
    if wrong:
        raise ConfigError(f"{path} is a {other}, not a {mine}: run it with "
                          f"`raysearch {other_command} {path}`")


def load_trial_config(path: str) -> tuple[TrialConfig, dict[str, Any]]:
    """Read ``raysearch train`` YAML: trial keys at the top, plus optional data/resources/storage/name.

    ``path`` is a file, a URL, or the name of a shipped config (``demo_trial``; see CONFIGS_DIR).
    Raises :class:`ConfigError` for a search space (see :func:`check_config_command`), an
    unknown key or a bad value.
    """
    from raysearch.storage import check_name

    path = resolve_config_path(path, CONFIGS_DIR)
    check_config_command(path, None, "train")
    raw = load_yaml(path)
    check_config_command(path, raw, "train")
    extra_keys = {"name", "data", "resources", "storage"}
    trial = {k: v for k, v in raw.items() if k not in extra_keys}
    cfg = TrialConfig.from_dict(trial)
    rest = {
        "name": check_name(raw.get("name", "train"), what="name"),
        "storage": norm_path(typed("storage", raw.get("storage", "reports"), str)),
        "data": build(DataConfig, raw.get("data") or {}, path="data"),
        "resources": build(ResourcesConfig, raw.get("resources") or {}, path="resources"),
    }
    rest["data"] = dataclasses.replace(rest["data"], root=norm_path(rest["data"].root))
    return cfg, rest


# ----------------------------------------------------------------------------- helpers


def _architectures() -> tuple[str, ...]:
    from raysearch.models.registry import ARCHITECTURES

    return tuple(ARCHITECTURES)


def check_range(key: str, value: float, low: float, high: float) -> None:
    """Raise ConfigError unless ``low <= value <= high`` (NaN fails), naming ``key`` and the bound."""
    if not value >= low:
        raise ConfigError(f"{key} must be >= {low!r}, got {value!r}", key=key)
    if not value <= high:
        raise ConfigError(f"{key} must be <= {high!r}, got {value!r}", key=key)


def check_seed(key: str, seed: int) -> None:
    """Raise :class:`ConfigError` naming ``key`` (a flag such as ``--seed``) unless ``seed`` is
    in [0, MAX_SEED], the seeds numpy's and Optuna's generators take: checked before any work."""
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{key} must be in [0, {MAX_SEED}], got {seed}")


def check_choice(key: str, value: Any, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{key}: unknown value {value!r}; allowed: {', '.join(map(str, allowed))}", key=key
        )


def mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"`{path}` must be a mapping, got {type(value).__name__}")
    return value


def no_unknown(raw: dict[str, Any], allowed: Any, path: str) -> None:
    for key in raw:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"unknown key `{where}`; allowed: {', '.join(sorted(allowed))}")


def typed(path: str, value: Any, typ: type) -> Any:
    if not isinstance(value, typ):
        raise ConfigError(f"`{path}` must be a {typ.__name__}, got {value!r}", key=path)
    return value


_TYPE_NAMES = {"int": int, "float": float, "str": str, "bool": bool}


def _coerce(path: str, value: Any, annotation: str) -> Any:
    """Check ``value`` against a dataclass field annotation string (postponed annotations)."""
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"`{path}` must not be empty", key=path)
    base = annotation.replace(" | None", "").strip()
    if base.startswith("tuple"):
        return value
    typ = _TYPE_NAMES.get(base)
    if typ is None:
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:  # YAML reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
        raise ConfigError(f"`{path}` must be {base}, got {value!r}", key=path)
    return value


def build(cls: type, data: dict[str, Any], *, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"`{path}` must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    no_unknown(data, known, path)
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        kwargs[key] = _coerce(where, value, str(known[key].type))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.under(path) from None


def norm_path(value: str) -> str:
    """Absolute local paths (Ray changes the working directory of trials); URLs stay as given."""
    if is_url(value):
        return value
    return os.path.abspath(os.path.expanduser(value))


def __getattr__(name: str):
    # Names that left this module but that saved experiments still pickle by it: raysearch._compat.
    from raysearch._compat import moved_name

    return moved_name(__name__, name)


__all__ = [
    "CONFIGS_DIR",
    "SEARCH_SPACES_DIR",
    "DataConfig",
    "ResourcesConfig",
    "TrialConfig",
    "build",
    "check_choice",
    "check_range",
    "load_trial_config",
    "load_yaml",
    "mapping",
    "no_unknown",
    "norm_path",
    "packaged",
    "resolve_config_path",
    "typed",
]
