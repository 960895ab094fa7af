"""The Python API: an experiment opened, inspected, extended and turned into a predictor, from a
notebook or a script, with the same functions the CLI calls.

::

    import raysearch

    exp = raysearch.open_experiment("reports/demo")      # a folder, a name under reports/, a URL
    exp.trials                                           # trials.parquet as a DataFrame
    exp.epochs                                           # epochs.parquet
    exp.best_trial, exp.best_checkpoint                  # a row, a TrialCheckpoint
    exp.ensemble                                         # an Ensemble, or None
    exp.predictor().predict(["study/image1.png"])        # raysearch.inference.Predictor

    exp = raysearch.tune("search_spaces/demo.yaml", data_root="data", num_samples=8)
    ens = raysearch.ensemble(exp, top=4)                 # `raysearch ensemble`, as an object

Anchors: Ray Tune's ``ResultGrid`` (results of a search as DataFrames, the best result and its
checkpoint) and AutoGluon's predictor (one object that loads from a folder and predicts).

Opening an experiment reads files only: no Ray, no torch until a predictor is asked for.
"""

from __future__ import annotations

from typing import Any

from raysearch.errors import ExperimentStateError
from raysearch.experiment import (
    ExperimentStatus,
    experiment_state,
    experiment_status,
    find_experiment,
    read_info,
    read_trial_checkpoint,
    trials_and_epochs,
)
from raysearch.inference.ensemble_folder import Ensemble
from raysearch.storage import exists, join

__all__ = ["Ensemble", "Experiment", "ensemble", "open_experiment", "tune"]


class Experiment:
    """An experiment folder (``raysearch tune`` or ``raysearch train``), read on demand.

    Tables are read once and kept; :meth:`reload` reads them again (a search still running).
    Raises :class:`ExperimentStateError` from :func:`open_experiment` when the folder is not an
    experiment.
    """

    def __init__(self, path: str) -> None:
        self.path = path.rstrip("/")
        self.info: dict[str, Any] = read_info(self.path)
        self._tables = None

    # --- what it is
    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.path.rsplit("/", 1)[-1])

    @property
    def kind(self) -> str:
        """``search`` (``raysearch tune``) or ``train`` (one trial)."""
        return str(self.info.get("kind", "search"))

    @property
    def state(self) -> str:
        """``finished``, ``interrupted``, ``running``, ``failed`` or ``no_space`` (see
        :func:`raysearch.experiment.experiment_state`)."""
        return experiment_state(self.path, self.info)[0]

    def status(self) -> ExperimentStatus:
        """What ``raysearch status`` shows, as a dataclass."""
        return experiment_status(self.path)

    def reload(self) -> Experiment:
        """Read ``experiment.json`` and the tables again. Returns self."""
        self.info = read_info(self.path)
        self._tables = None
        return self

    # --- the results
    def _read(self):
        if self._tables is None:
            self._tables = trials_and_epochs(self.path, running=self.state == "running")
        return self._tables

    @property
    def trials(self):
        """One row per trial, lowest ``best_val_loss`` first (``trials.parquet``; from the
        checkpoints while the search runs). ``best_checkpoint`` is a full URI."""
        return self._read()[0]

    @property
    def epochs(self):
        """One row per (trial, epoch) reported (``epochs.parquet``)."""
        return self._read()[1]

    @property
    def best_trial(self):
        """The row (a pandas Series) of the trial with the lowest ``best_val_loss`` that has a
        checkpoint. Raises :class:`ExperimentStateError` when no trial has one."""
        t = self.trials
        usable = t[t["best_checkpoint"].notna() & t["best_val_loss"].notna()] if len(t) else t
        if not len(usable):
            raise ExperimentStateError(f"experiment {self.path} has no trial with a checkpoint")
        return usable.sort_values(["best_val_loss", "trial_id"], kind="stable").iloc[0]

    @property
    def best_checkpoint(self):
        """The best trial's best checkpoint as a
        :class:`~raysearch.experiment.TrialCheckpoint` (URI, trial config, task)."""
        best = self.best_trial
        return read_trial_checkpoint(str(best["trial_id"]), str(best["best_checkpoint"]),
                                     with_val=False)

    @property
    def ensemble(self) -> Ensemble | None:
        """The experiment's ensemble (``<experiment>/ensemble/``), or None before one was made."""
        folder = join(self.path, "ensemble")
        return Ensemble.from_dir(folder) if exists(join(folder, "members.parquet")) else None

    def predictor(self, *, top: int | None = None, device=None, batch_size: int = 64):
        """A :class:`raysearch.inference.Predictor`: the ensemble when there is one (and ``top``
        is None), else the ``top`` best trials (default 1), equally weighted."""
        from raysearch.inference.predictor import Predictor

        return Predictor.from_dir(self.path, top=top, device=device, batch_size=batch_size)

    def __repr__(self) -> str:
        return (f"Experiment({self.name!r}, kind={self.kind!r}, state={self.state!r}, "
                f"trials={self.info.get('trials', '?')}, path={self.path!r})")


def open_experiment(path_or_url: str | None = None, *, storage: str = "reports") -> Experiment:
    """The experiment at ``path_or_url``: a folder, a URL (``gs://bucket/reports/demo``), a
    bare name under ``storage``, or None for the newest under ``storage``. Reads files only (no
    Ray). Raises :class:`ConfigError` naming the experiments that do exist when there is none
    there."""
    return Experiment(find_experiment(path_or_url, storage=storage))


def tune(
    space: str,
    *,
    data_root: str | None = None,
    name: str | None = None,
    storage: str | None = None,
    num_samples: int | None = None,
    extend: int | None = None,
    max_concurrent: int | None = None,
    time_budget: float | str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    address: str | None = None,
    verbose: bool = False,
    trust: bool = False,
    console=None,
) -> Experiment:
    """``raysearch tune``: run (or resume, or extend) the search in the search-space file
    ``space``; returns the finished :class:`Experiment`. The keywords are the CLI's options
    (``time_budget``: seconds, or text such as ``"6h"``). Raises what ``run_search`` raises."""
    from raysearch.search.budget import parse_duration
    from raysearch.search.space import load_search_space
    from raysearch.search.tune import extended_num_samples, run_search

    budget = parse_duration(time_budget, what="time_budget") if time_budget is not None else None
    spec = load_search_space(space, data_root=data_root, name=name, storage=storage,
                             num_samples=num_samples, max_concurrent=max_concurrent)
    if extend is not None:
        spec = extended_num_samples(spec, extend)
    path = run_search(spec, resume=resume, overwrite=overwrite, address=address, verbose=verbose,
                      trust=trust, time_budget_s=budget, console=console)
    return Experiment(path)


def ensemble(
    experiment: str | Experiment | None = None,
    *,
    storage: str = "reports",
    top: int = 4,
    method: str = "top",
    tta: bool = False,
    out: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    oof: bool = False,
    console=None,
) -> Ensemble:
    """``raysearch ensemble``: select members of ``experiment`` (an :class:`Experiment`, a
    folder, a name, or None for the newest under ``storage``), score them on test, write the
    reports; returns the :class:`Ensemble` written. ``oof``: select on the out-of-fold
    predictions of :func:`refit` instead of the val split (``ensemble --oof``)."""
    from raysearch.ensemble import make_ensemble

    return make_ensemble(experiment, storage=storage, top=top, method=method, tta=tta, out=out,
                         n_boot=n_boot, seed=seed, oof=oof, console=console)


def refit(
    experiment: str | Experiment | None = None,
    *,
    storage: str = "reports",
    top: int = 2,
    folds: int | None = None,
    seed: int | None = None,
    address: str | None = None,
    console=None,
) -> Experiment:
    """``raysearch refit``: retrain the ``top`` best configurations of ``experiment`` on
    ``folds`` patient-grouped folds (:mod:`raysearch.search.refit`); returns the experiment,
    whose ``trials`` then hold the cross-validated columns (``cv_val_loss_mean``, ...)."""
    from raysearch.experiment import find_experiment
    from raysearch.search.refit import run_refit

    path = find_experiment(getattr(experiment, "path", experiment), storage=storage)
    run_refit(experiment=path, storage=storage, top=top, folds=folds, seed=seed,
              address=address, console=console)
    return Experiment(path)
