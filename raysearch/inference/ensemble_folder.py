"""Inference stage, an ensemble folder read back (``raysearch ensemble``'s output): its members
and weights, its metrics and settings, and a predictor of it. Part of the Python API
(``raysearch.ensemble(...)`` returns one; ``Experiment.ensemble`` is one)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from raysearch.errors import ExperimentStateError
from raysearch.experiment import resolve
from raysearch.storage import exists, join, read_bytes, read_parquet

__all__ = ["Ensemble"]


@dataclass(frozen=True)
class Ensemble:
    """An ensemble folder (``raysearch ensemble``'s output) read back.

    ``members``: ``members.parquet`` (rank, trial_id, weight, best_checkpoint resolved to a full URI,
    the trial's config); ``weights``: trial id -> weight (summing to 1); ``metrics``:
    ``category_metrics.parquet``; ``summary``: ``ensemble.json`` (method, top, tta, task, ...).
    """

    path: str
    members: Any  # pandas.DataFrame
    weights: dict[str, float]
    metrics: Any  # pandas.DataFrame, or None before the test split was scored
    summary: dict[str, Any]

    @classmethod
    def from_dir(cls, path: str) -> Ensemble:
        """Read the ensemble folder at ``path``. Raises :class:`ExperimentStateError` when it has
        no ``members.parquet``."""
        path = path.rstrip("/")
        uri = join(path, "members.parquet")
        if not exists(uri):
            raise ExperimentStateError(f"{path} is not an ensemble folder (no members.parquet)")
        from raysearch.experiment.schema import normalize_members

        members = normalize_members(read_parquet(uri))  # any release's column names
        members["trial_id"] = members["trial_id"].astype(str)
        experiment = path.rsplit("/", 1)[0]
        members["best_checkpoint"] = [resolve(experiment, str(c))
                                      for c in members["best_checkpoint"]]
        metrics_uri = join(path, "category_metrics.parquet")
        metrics = read_parquet(metrics_uri) if exists(metrics_uri) else None
        summary_uri = join(path, "ensemble.json")
        summary = json.loads(read_bytes(summary_uri)) if exists(summary_uri) else {}
        weights = dict(zip(members["trial_id"], members["weight"].astype(float)))
        return cls(path=path, members=members, weights=weights, metrics=metrics, summary=summary)

    @property
    def test_metrics(self):
        """The ensemble's own rows of the metrics on the test split (one per group, then ALL)."""
        if self.metrics is None:
            return None
        m = self.metrics
        return m[(m["model"] == "ensemble") & (m["split"] == "test")].reset_index(drop=True)

    def predictor(self, *, device=None, batch_size: int = 64):
        """A :class:`raysearch.inference.Predictor` of these members with their weights."""
        from raysearch.inference.predictor import Predictor

        return Predictor.from_dir(self.path, device=device, batch_size=batch_size)

    def __repr__(self) -> str:
        shown = ", ".join(f"{t} (w={w:.2f})" for t, w in self.weights.items())
        method = self.summary.get("method", "?")
        return f"Ensemble({self.path!r}, method={method!r}, members=[{shown}])"
