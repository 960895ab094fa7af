"""Data stage, the task contract: what a dataset asks a model to predict, and how its images add
up to studies. A reader returns a manifest together with its :class:`Task`; every later stage (the
model head, the loss, the metrics, the ensemble, the predictor, the reports) reads the labels and
the group from the task and knows nothing else about the dataset.

MURA (``raysearch.data.mura.MURA_TASK``): one binary label per study ("abnormal"), metrics per body part, and a
study's probability is the mean of its views' (Rajpurkar et al. 2017, arXiv:1712.06957, sec. 3).
CheXpert (Irvin et al. 2019, arXiv:1901.07031) has 14 observations that may be uncertain or not
mentioned, metrics per view, and a study's probability is the max of its views'.

Manifest columns of a task's labels (one row per image):

* K = 1: ``label`` (int 0/1), as MURA's manifest has always had it;
* K > 1: ``label_<name>`` per label (float 1.0 / 0.0, NaN where the label is masked).

Predictions (``prob``) follow the same rule: ``prob`` for K = 1, ``prob_<name>`` per label for
K > 1, and tables of results take one row per (study, label) with a ``label_name`` column.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from raysearch.errors import ConfigError

__all__ = ["AGGREGATIONS", "Task", "slug"]

AGGREGATIONS = ("mean", "max")


@dataclass(frozen=True)
class Task:
    """What a dataset asks: ``labels`` (K names), ``group`` (the manifest column per-group metrics
    are taken over, e.g. ``body_part``), ``groups`` (its known values in report order; others are
    reported after them), ``aggregation`` (``mean`` or ``max`` of a study's image probabilities)
    and ``maskable`` (labels that may be missing for an image; the loss masks them)."""

    name: str
    labels: tuple[str, ...]
    group: str
    groups: tuple[str, ...] = ()
    aggregation: str = "mean"
    maskable: tuple[str, ...] = ()
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not self.labels:
            raise ConfigError(f"task {self.name!r}: needs at least one label")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"task {self.name!r}: labels must be unique, got {self.labels}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"task {self.name!r}: aggregation must be one of {', '.join(AGGREGATIONS)}, "
                f"got {self.aggregation!r}"
            )
        unknown = [m for m in self.maskable if m not in self.labels]
        if unknown:
            raise ConfigError(f"task {self.name!r}: maskable labels {unknown} are not labels")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"task {self.name!r}: threshold must be in (0, 1), got {self.threshold}")

    @property
    def k(self) -> int:
        """The number of labels (model outputs)."""
        return len(self.labels)

    @property
    def label_columns(self) -> tuple[str, ...]:
        """Manifest columns of the labels, in label order (``label`` when K = 1)."""
        return ("label",) if self.k == 1 else tuple(f"label_{slug(n)}" for n in self.labels)

    @property
    def prob_columns(self) -> tuple[str, ...]:
        """Prediction columns, in label order (``prob`` when K = 1)."""
        return ("prob",) if self.k == 1 else tuple(f"prob_{slug(n)}" for n in self.labels)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("labels", "groups", "maskable"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Task:
        """The task saved with an experiment or checkpoint; MURA's for ones saved before tasks."""
        if not data:
            from raysearch.data.mura import MURA_TASK

            return MURA_TASK
        kwargs = dict(data)
        for key in ("labels", "groups", "maskable"):
            kwargs[key] = tuple(kwargs.get(key) or ())
        return cls(**kwargs)


def slug(name: str) -> str:
    """A label name as a column suffix: 'Pleural Effusion' -> 'pleural_effusion'."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")
