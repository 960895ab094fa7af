"""The experiment folder, and its one owner: every stage reads and writes an experiment through
here. Its name, its layout, its marker and info (``experiment.json``), one writer at a time, its
trials and their checkpoints, its results, and which of its files raysearch will hand to Ray to
unpickle.

An experiment lives at ``<storage>/<name>/`` (a local folder or a bucket prefix)::

    experiment.json          the marker: written by raysearch first, before anything else
    .raysearch.lock          held by the one run that writes the experiment (see ExperimentLock)
    raysearch-trust.json     HMAC-signed hashes of the Ray state files this machine wrote
    manifest.parquet         the data and the split
    search_space.yaml, trials.parquet, epochs.parquet, ensemble/
    train-<trial_id>/checkpoint_*/   each trial's checkpoints (Ray Train)
    tuner.pkl, experiment_state-*.json, searcher-state-*.pkl, ...   Ray Tune's own state

A **name** is one safe path component, wherever it comes from (a YAML file, ``--name``, a bench):
no separators, not ``.`` or ``..``, no control or glob characters. Before anything is removed,
:func:`remove_experiment` checks that the target is a direct child of the storage root and holds
the marker; callers remove only after every other check has passed.

Paths inside the experiment (checkpoints, the manifest) are stored relative to it, so a copied or
moved experiment (another disk, a bucket copied to a laptop) still works: :func:`resolve`.

**Trust.** ``Tuner.restore`` unpickles ``tuner.pkl``, the searcher state and the experiment state
(whose JSON carries cloudpickled objects), and Ray loads a failed trial's ``error.pkl``: whoever can
write the storage folder can run code on the machine that resumes the search. ``weights_only``
does not cover these. raysearch signs the SHA-256 of every such file it lets Ray write
(:func:`sign_ray_state`, an HMAC with a key kept outside the storage) and, before a resume,
refuses any such file it did not sign (:func:`verify_ray_state`).
"""

from __future__ import annotations

from raysearch.experiment.folder import (
    LOCK_NAME,
    MARKER,
    TRUST_NAME,
    cache_dir,
    check_model_folder,
    check_writable,
    experiment_dir,
    find_experiment,
    is_experiment,
    list_experiments,
    read_info,
    relative,
    remove_experiment,
    resolve,
    update_info,
)
from raysearch.experiment.lock import (
    ExperimentLock,
    lock_holder,
)
from raysearch.experiment.status import (
    ExperimentStatus,
    experiment_state,
    experiment_status,
    list_status,
    trials_and_epochs,
)
from raysearch.experiment.trials import (
    CHECKPOINT_FILES,
    EPOCH_COLUMNS,
    TASK_FILE,
    TRIAL_COLUMNS,
    TRIAL_STATUSES,
    TrialCheckpoint,
    checkpoint_damage,
    latest_history,
    read_manifest,
    read_trial_checkpoint,
    read_trials,
    results_tables,
    run_checkpoints,
    run_dir,
    trial_summary,
    write_results,
)
from raysearch.experiment.trust import (
    RAY_STATE_PATTERNS,
    check_ray_state_intact,
    fail_on_restore_error,
    raysearch_error_in,
    sign_ray_state,
    unfinished_trials,
    verify_ray_state,
)
from raysearch.storage import RESERVED_NAMES, check_name

__all__ = [
    "CHECKPOINT_FILES",
    "EPOCH_COLUMNS",
    "LOCK_NAME",
    "MARKER",
    "RAY_STATE_PATTERNS",
    "RESERVED_NAMES",
    "TASK_FILE",
    "TRIAL_COLUMNS",
    "TRIAL_STATUSES",
    "TRUST_NAME",
    "ExperimentLock",
    "ExperimentStatus",
    "TrialCheckpoint",
    "cache_dir",
    "check_model_folder",
    "check_name",
    "check_ray_state_intact",
    "check_writable",
    "checkpoint_damage",
    "experiment_dir",
    "experiment_state",
    "experiment_status",
    "fail_on_restore_error",
    "find_experiment",
    "is_experiment",
    "latest_history",
    "list_experiments",
    "list_status",
    "lock_holder",
    "raysearch_error_in",
    "read_info",
    "read_manifest",
    "read_trial_checkpoint",
    "read_trials",
    "relative",
    "remove_experiment",
    "resolve",
    "results_tables",
    "run_checkpoints",
    "run_dir",
    "sign_ray_state",
    "trial_summary",
    "trials_and_epochs",
    "unfinished_trials",
    "update_info",
    "verify_ray_state",
    "write_results",
]
