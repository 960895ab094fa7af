"""Search stage, the search: many trials under Ray Tune with Optuna (TPE) and ASHA; resumable and fault tolerant.

``run_search(spec)`` prepares the data once on the driver, turns the search space into an Optuna
define-by-run function (conditional parameters allowed), sizes concurrency so that trial drivers
plus their worker placement groups always fit the cluster, and writes ``trials.parquet``,
``epochs.parquet``, ``search_space.yaml`` and ``experiment.json`` under the experiment folder.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import yaml

from raysearch.data.dataset import Task
from raysearch.errors import (
    ConfigError,
    DataError,
    ExperimentExistsError,
    SearchFailedError,
    SearchInterrupted,
    StorageError,
)
from raysearch.experiment import (
    ExperimentLock,
    check_ray_state_intact,
    check_writable,
    fail_on_restore_error,
    is_experiment,
    read_info,
    remove_experiment,
    sign_ray_state,
    unfinished_trials,
    update_info,
    verify_ray_state,
    write_results,
)
from raysearch.search.preflight import preflight_search, weight_sources
from raysearch.search.preflight import trial_values as _values
from raysearch.search.progress import SearchProgress, TrustCallback
from raysearch.search.resources import DRIVER_CPU, ResourcePlan, plan_resources
from raysearch.search.results import collect_results
from raysearch.search.space import SearchSpace
from raysearch.storage import (
    atomic_write_text,
    exists,
    join,
    ray_storage_args,
    read_bytes,
)

# What the search minimises, for Optuna and ASHA alike: the lowest val_loss a trial has reached
# so far. A trial is worth its best checkpoint (that is what `ensemble` loads), so Optuna should
# learn from its best epoch, not its last, and ASHA should not cut a trial for one noisy epoch.
OBJECTIVE = "best_val_loss"


# ----------------------------------------------------------------------------- search space


def image_sizes(spec: SearchSpace) -> list[int]:
    """Image sizes that trials may ask for, so the driver can build their caches up front."""
    sizes: set[int] = set()
    if not any(p.name == "image_size" for p in spec.space):
        sizes.add(int(spec.trial.get("image_size", 320)))
    for p in spec.space:
        if p.name == "image_size" and p.kind in ("choice", "constant"):
            sizes.update(int(v) for v in p.values)
        elif p.name == "image_size" and p.kind == "int" and p.high - p.low <= 512:
            step = int(p.step or 1)
            sizes.update(range(int(p.low), int(p.high) + 1, step))
    for point in spec.search.points_to_evaluate:
        if "image_size" in point:
            sizes.add(int(point["image_size"]))
    return sorted(sizes)


def check_class_weighting(spec: SearchSpace, manifest, task, *, console) -> None:
    """Every class weighting a trial may use, on the training split, before Ray starts: a scheme
    that cannot work on this data raises; where one departs from its formula, say so."""
    from raysearch.data.labels import retarget
    from raysearch.train.losses import label_weights, weighting_notes

    train = manifest[manifest["split"] == "train"]
    # trial.uncertain re-derives training targets from the raw label codes (not MURA's)
    for policy in sorted(_values(spec, "uncertain") - {"None"}):
        if retarget(train, task, uncertain=policy).empty:
            raise DataError(f"uncertain {policy}: no training images are left")
    for scheme in sorted(_values(spec, "class_weighting")):
        if task.k > 1:
            label_weights(train, task=task, scheme=scheme)  # raises what cannot work
            continue
        for note in weighting_notes(train, scheme=scheme, group=task.group):
            console.print(f"[yellow]{note}[/]")


# ----------------------------------------------------------------------------- the search


def run_search(
    spec: SearchSpace,
    *,
    resume: bool = False,
    overwrite: bool = False,
    address: str | None = None,
    verbose: bool = False,
    trust: bool = False,
    time_budget_s: float | None = None,
    console=None,
    callbacks: tuple = (),
) -> str:
    """Run (or resume, or extend) the search described by ``spec``. Returns the experiment
    folder URI.

    A finished experiment run again with a larger ``spec.search.num_samples`` goes on with new
    trials, its Optuna study and ASHA rungs restored (:mod:`raysearch.search.budget`); only a
    changed space (or a smaller count) is refused. ``time_budget_s``: after that many seconds no
    new trial starts, the running ones finish, and the search ends as finished. ``callbacks``:
    more ``ray.tune.Callback`` objects for the driver (instruments, such as ``bench search``'s
    trial clock); they are not saved with the experiment.

    Everything that can be checked is checked before anything is deleted and before Ray starts:
    the experiment's lock, its saved state (intact, and signed by raysearch unless ``trust``),
    the weights, the dataset, the free space. ``overwrite`` deletes the old experiment only then.

    Raises :class:`ExperimentLockedError` when another run holds the experiment,
    :class:`ExperimentStateError` for a damaged or unsigned saved state (a search never falls back
    to a new, smaller one), :class:`StorageError` when the storage fills up,
    :class:`SearchInterrupted` (exit 130) after Ctrl-C, with the results written so far marked
    unfinished, and :class:`SearchFailedError` when every trial failed.
    """
    from rich.console import Console

    from raysearch.report.live import say_stage

    console = console or Console(stderr=True)
    preflight_search(spec, resume=resume, overwrite=overwrite, address=address)
    exp_dir = spec.experiment_dir
    say_stage(console, f"{spec.name}: checking {exp_dir}")
    spec_yaml = yaml.safe_dump(spec.to_dict(), sort_keys=False)
    with ExperimentLock(exp_dir, command="tune"):
        restoring = _check_existing(spec, exp_dir, spec_yaml, resume=resume, overwrite=overwrite)
        if restoring:
            _check_saved_state(spec, exp_dir, trust=trust, console=console)
        task = _prepare(spec, exp_dir, spec_yaml, restoring=restoring, overwrite=overwrite,
                        console=console)
        t0 = time.time()
        deadline = t0 + time_budget_s if time_budget_s is not None else None
        grid, budget_spent = _fit(spec, exp_dir, task, restoring=restoring, address=address,
                                  verbose=verbose, deadline=deadline, console=console,
                                  callbacks=callbacks)
        return _finish(spec, exp_dir, grid, seconds=time.time() - t0, budget_spent=budget_spent,
                       console=console)


def _check_saved_state(spec: SearchSpace, exp_dir: str, *, trust: bool, console) -> None:
    """Before a resume: the saved state must be intact and signed by raysearch (``trust`` signs
    it instead); a moved data root is only noted (the saved manifest is what resumes)."""
    saved = yaml.safe_load(read_bytes(join(exp_dir, "search_space.yaml"))) or {}
    saved_root = (saved.get("data") or {}).get("root")
    if saved_root and saved_root != spec.data.root:
        console.print(f"[yellow]resuming on the experiment's saved manifest (its data root "
                      f"was {saved_root}, not {spec.data.root})[/]")
    check_ray_state_intact(exp_dir)
    if trust:
        sign_ray_state(exp_dir)
    else:
        verify_ray_state(exp_dir)


def _prepare(spec, exp_dir, spec_yaml, *, restoring, overwrite, console) -> Task:
    """Everything before Ray: weights, dataset, class weighting, free space; then (only then) the
    overwrite, the experiment's info and the data prepared once. Returns the task."""
    from raysearch.data.prepare import check_free_space, prepare_data, read_dataset
    from raysearch.models.factory import check_weights, checkpoint_bytes
    from raysearch.report.live import say_stage

    check_weights(weight_sources(spec))
    manifest, task = None, None
    if not (restoring and exists(join(exp_dir, "manifest.parquet"))):
        say_stage(console, f"reading the dataset at {spec.data.root}")
        manifest, task = read_dataset(spec.data, console=console)
        check_class_weighting(spec, manifest, task, console=console)
        check_free_space(
            manifest=manifest, image_sizes=image_sizes(spec), cache_dir=spec.cache_dir,
            experiment_dir=exp_dir,
            # binary relevance keeps one model per label in a checkpoint
            checkpoint_bytes=max(checkpoint_bytes(a) for a, _ in weight_sources(spec))
            * (task.k if "True" in _values(spec, "binary_relevance") else 1),
            num_trials=spec.search.num_samples, console=console,
        )
    else:
        task = Task.from_dict(read_info(exp_dir).get("task"))
    if overwrite:
        remove_experiment(exp_dir, storage=spec.storage)
    update_info(
        exp_dir, kind="search", name=spec.name, state="running", manifest="manifest.parquet",
        cache_dir=spec.cache_dir, task=task.to_dict(), num_samples=spec.search.num_samples,
        data={"root": spec.data.root, "val_fraction": spec.data.val_fraction, "seed": spec.data.seed},
    )
    if manifest is not None:  # data once, on the driver: the manifest and decode-once caches
        say_stage(console, "preparing data (decode-once caches at "
                  f"{', '.join(str(s) for s in image_sizes(spec))} px)")
        prepare_data(manifest, experiment_dir=exp_dir, cache_dir=spec.cache_dir,
                     image_sizes=image_sizes(spec))
    atomic_write_text(join(exp_dir, "search_space.yaml"), spec_yaml)
    return task


def _fit(spec, exp_dir, task, *, restoring, address, verbose, console, deadline=None,
         callbacks=()):
    """Ray: plan the resources, build (or restore) the Tuner, rebuild ASHA's rungs, run it.
    Returns Tune's result grid and whether the time budget ended the search; errors a user can
    act on come out as raysearch's."""
    from raysearch.cluster import check_cluster_resources, init_ray, ray_address
    from raysearch.report.live import say_stage
    from raysearch.train.trainer import RunSettings

    say_stage(console, "starting Ray")
    init_ray(address=address, verbose=verbose)
    import optuna
    import ray

    if ray_address(address):  # a local machine was checked before Ray started
        check_cluster_resources(spec.resources)

    if not verbose:  # Optuna logs every study it creates at INFO
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    node_cpus = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    plan = plan_resources(spec.resources, ray.cluster_resources(), node_cpus=node_cpus)
    console.print(
        f"[bold]{spec.name}[/]: {spec.search.num_samples} trials, {plan.max_concurrent} at a time, "
        f"{plan.workers} worker(s) x {plan.cpus_per_worker:g} CPU"
        + (f" + {plan.gpus_per_worker:g} GPU" if plan.gpus_per_worker else "")
        + f" per trial -> {exp_dir}"
    )
    run: RunSettings = {
        "trial": dict(spec.trial),
        "space_names": [p.name for p in spec.space],
        "max_epochs": spec.scheduler.max_epochs,
        "task": task.to_dict(),
        "manifest": join(exp_dir, "manifest.parquet"),
        "cache_dir": spec.cache_dir,
        "experiment_dir": exp_dir,
        "workers": plan.workers,
        "gpus_per_worker": plan.gpus_per_worker,
        "cpus_per_worker": plan.cpus_per_worker,
        "torch_threads": plan.torch_threads,
    }
    # What each trial holds, so that `raysearch status` can count GPU- or CPU-hours.
    update_info(exp_dir, resources={"workers": plan.workers, "gpus_per_worker": plan.gpus_per_worker,
                                    "cpus_per_worker": plan.cpus_per_worker})
    progress = SearchProgress(spec, console=console)
    callbacks = [progress, TrustCallback(exp_dir), *callbacks]
    retry_failed = restoring and read_info(exp_dir).get("state") == "no_space"
    with fail_on_restore_error():
        tuner = _make_tuner(spec, plan, run, callbacks, restoring=restoring,
                            retry_failed=retry_failed, deadline=deadline)
    sign_ray_state(exp_dir)  # tuner.pkl, written by the Tuner
    if restoring and spec.scheduler.kind == "asha":
        from raysearch.search.scheduler import restore_rungs, trial_histories

        # Ray restores the searcher but not ASHA's rungs (ray#30838); rebuild them.
        histories = trial_histories(exp_dir)
        n = restore_rungs(tuner._local_tuner._tune_config.scheduler, histories,
                          metric=OBJECTIVE, mode="min")
        console.print(f"ASHA rungs rebuilt from the checkpoints of {len(histories)} trial(s): {n} records")
    try:
        with progress, fail_on_restore_error():
            progress.stage("starting trials")
            grid = tuner.fit()
    except Exception as e:
        try:
            _raise_known(e, storage=exp_dir)
        except StorageError:
            _mark_no_space(exp_dir)
            raise
        raise
    sign_ray_state(exp_dir)  # the final state, saved and synced before fit() returned
    return grid, bool(getattr(tuner._local_tuner._tune_config.search_alg, "budget_spent", False))


def _finish(spec, exp_dir, grid, *, seconds: float, console, budget_spent: bool = False) -> str:
    """Write the results (marked finished, interrupted or failed), show the best trials, and
    raise for an interrupted, failed or out-of-space search. A search the time budget ended
    with fewer trials than asked for is finished, not interrupted."""
    from raysearch.report.tables import best_trials_table

    trials, epochs = collect_results(grid, spec, unfinished=unfinished_trials(exp_dir))
    unfinished = int((trials["status"] == "unfinished").sum()) if len(trials) else 0
    short = len(trials) < spec.search.num_samples and not budget_spent
    interrupted = unfinished > 0 or short
    failed = len(trials) > 0 and bool((trials["status"] == "failed").all())
    state = "interrupted" if interrupted else ("failed" if failed else "finished")
    write_results(exp_dir, trials, epochs)
    update_info(exp_dir, state=state, trials=len(trials), num_samples=spec.search.num_samples)
    if len(trials) and trials["best_val_loss"].notna().any():
        console.print(best_trials_table(trials, title=f"{spec.name}: best trials",
                                        width=console.width))
    if budget_spent:
        console.print(f"time budget spent: {len(trials)} of {spec.search.num_samples} trials "
                      "ran; run again with a budget to go on")
    n_failed = int((trials["status"] == "failed").sum()) if len(trials) else 0
    console.print(
        f"{len(trials)} trials ({n_failed} failed"
        + (f", {unfinished} unfinished" if unfinished else "")
        + f"), {int(epochs.shape[0])} epochs in {seconds:.0f} s. "
        f"Results: {join(exp_dir, 'trials.parquet')}"
    )
    try:
        _raise_for_trial_errors(trials, storage=exp_dir)
    except StorageError:
        _mark_no_space(exp_dir)
        raise
    if interrupted:
        raise SearchInterrupted(
            f"interrupted; run the same command to resume ({len(trials) - unfinished} of "
            f"{spec.search.num_samples} trials ended; results so far are marked unfinished)"
        )
    if failed:
        raise SearchFailedError(_failure_summary(trials))
    return exp_dir


NO_SPACE = ("No space left on device", "[Errno 28]", "ENOSPC")


def _mark_no_space(exp_dir: str) -> None:
    """Record that the storage filled up: the next resume retries the trials that failed of it
    (Ray would otherwise keep them as failed for good)."""
    with contextlib.suppress(Exception):  # the disk may be too full even for this
        update_info(exp_dir, state="no_space")


def _raise_known(error: BaseException, *, storage: str) -> None:
    """Turn what Ray raised into raysearch's error when its cause is one a user can act on."""
    from raysearch.errors import find_os_error, os_error_message
    from raysearch.experiment import raysearch_error_in

    known = raysearch_error_in(error)
    if known is not None:
        raise known from error
    os_error = find_os_error(error)
    message = None
    if os_error is not None:
        message = os_error_message(os_error, path=os_error.filename or storage)
    if message is None and (any(s in str(error) for s in NO_SPACE) or _storage_full(storage)):
        message = f"no space left on {storage}"
    if message is not None:
        full = message.startswith(("no space", "disk quota"))
        advice = "free some space" if full else "fix it"
        raise StorageError(f"{message}; {advice}, then run the same command to resume") from error


def _storage_full(uri: str, *, margin: int = 1 << 20) -> bool:
    """True when the local file system holding ``uri`` has less than ``margin`` bytes free."""
    from raysearch.data.prepare import free_bytes

    free = free_bytes(uri)
    return free is not None and free < margin


def _raise_for_trial_errors(trials, *, storage: str) -> None:
    if not len(trials) or "error" not in trials:
        return
    errors = trials["error"].dropna().astype(str)
    if errors.map(lambda e: any(s in e for s in NO_SPACE)).any() or (
        len(errors) and _storage_full(storage)
    ):
        raise StorageError(
            f"no space left on {storage}: {len(errors)} trial(s) failed writing there; free some "
            "space, then run the same command to resume"
        )


def _failure_summary(trials) -> str:
    errors = trials["error"].fillna("(no error message)").astype(str)
    counts = errors.value_counts()
    common, n = counts.index[0], int(counts.iloc[0])
    return (
        f"all {len(trials)} trials failed; the most common error ({n} of them): {common}"
    )


def _check_existing(spec, exp_dir, spec_yaml, *, resume, overwrite) -> bool:
    """True when an existing experiment should be restored. Refuses to overwrite silently, to
    write into a folder that is not a raysearch experiment, and to mix a search into a
    ``raysearch train`` experiment. Deletes nothing (``overwrite`` is checked here, done later)."""
    from ray.tune import Tuner

    if overwrite:
        remove_experiment(exp_dir, storage=spec.storage, dry_run=True)
        return False
    state_exists = Tuner.can_restore(**_restore_path_args(exp_dir))
    if is_experiment(exp_dir):
        kind = read_info(exp_dir).get("kind", "search")
        if kind != "search":
            raise ExperimentExistsError(
                f"{exp_dir} holds a `raysearch {kind}` experiment, not a search; use --name to "
                "start a new one or --overwrite to replace it",
                experiment_dir=exp_dir,
            )
    else:
        check_writable(exp_dir)
    if not state_exists:
        if resume:
            raise ConfigError(f"--resume: no experiment to resume at {exp_dir}")
        return False
    saved = join(exp_dir, "search_space.yaml")
    if exists(saved):
        saved_yaml = read_bytes(saved).decode()
        if (changed := space_difference(saved_yaml, spec_yaml)) is not None:
            raise ExperimentExistsError(
                f"experiment {spec.name!r} already exists at {exp_dir} with a different search "
                f"space ({changed}); use --name to start a new one or --overwrite to replace it",
                experiment_dir=exp_dir,
            )
        before = saved_num_samples(saved_yaml)
        if before is not None and spec.search.num_samples < before:
            raise ConfigError(
                f"search.num_samples: {spec.search.num_samples} is fewer than the {before} trials "
                f"experiment {spec.name!r} already asked for; give {before} or more to resume "
                "or extend it"
            )
    return True


def saved_num_samples(saved_yaml: str) -> int | None:
    """``search.num_samples`` of a saved ``search_space.yaml`` (None when it has none)."""
    saved = yaml.safe_load(saved_yaml)
    n = ((saved or {}).get("search") or {}).get("num_samples") if isinstance(saved, dict) else None
    return int(n) if isinstance(n, int) else None


def extended_num_samples(spec: SearchSpace, extend: int) -> SearchSpace:
    """``spec`` asking for ``extend`` more trials than its saved experiment did (``--extend``).
    Raises :class:`ConfigError` when ``extend < 1`` or there is no saved experiment."""
    import dataclasses

    if extend < 1:
        raise ConfigError(f"--extend: must be >= 1, got {extend}")
    saved = join(spec.experiment_dir, "search_space.yaml")
    before = saved_num_samples(read_bytes(saved).decode()) if exists(saved) else None
    if before is None:
        raise ConfigError(f"--extend: no experiment to extend at {spec.experiment_dir}")
    search = dataclasses.replace(spec.search, num_samples=before + extend)
    return dataclasses.replace(spec, search=search)


def _same_space(saved_yaml: str, spec_yaml: str) -> bool:
    """Whether two resolved search spaces describe the same search (:func:`space_difference`)."""
    return space_difference(saved_yaml, spec_yaml) is None


def space_difference(saved_yaml: str, spec_yaml: str) -> str | None:
    """None when two resolved search spaces describe the same search, else the first key path
    that differs with both values, e.g. ``space.lr.loguniform: [0.001, 0.01] saved, [0.001,
    0.1] now``. Where the experiment and its
    data are stored does not count: a moved or copied experiment resumes from its new place, on
    the manifest (the images and the split) it saved. Nor does the trial count: a larger one
    extends the search, and :func:`_check_existing` refuses a smaller one. Nor does how many
    trials run at once (``resources.max_concurrent``, ``--max-concurrent``): it sets no trial's
    config or training, and a restored search takes this run's limit (:func:`_make_tuner`)."""
    saved, now = yaml.safe_load(saved_yaml), yaml.safe_load(spec_yaml)
    if not isinstance(saved, dict):
        return "the saved search_space.yaml is not a mapping"
    _fill_defaults(saved)
    _fill_defaults(now)
    for d in (saved, now):
        d.pop("storage", None)
        if isinstance(d.get("search"), dict):  # more trials extend the search: checked apart
            d["search"].pop("num_samples", None)
        if isinstance(d.get("data"), dict):
            for key in ("root", "cache_dir"):
                d["data"].pop(key, None)
        if isinstance(d.get("resources"), dict):
            d["resources"].pop("max_concurrent", None)
    return _first_difference(saved, now, "")


def _first_difference(saved: Any, now: Any, path: str) -> str | None:
    """The first key path (in the saved file's order, then the new one's) where ``saved`` and
    ``now`` differ, with both values; None when they are equal."""
    if saved == now:
        return None
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in [*saved, *(k for k in now if k not in saved)]:
            where = f"{path}.{key}" if path else str(key)
            if key not in now:
                return f"{where}: saved, now absent"
            if key not in saved:
                return f"{where}: absent when saved, now {_flow(now[key])}"
            if (found := _first_difference(saved[key], now[key], where)) is not None:
                return found
    return f"{path or 'the file'}: {_flow(saved)} saved, {_flow(now)} now"


def _flow(value: Any) -> str:
    """``value`` as one line of YAML flow style, cut at 80 characters."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("...").strip()
    return text if len(text) <= 80 else text[:77] + "..."


def _fill_defaults(raw: dict[str, Any]) -> None:
    """Settings a later release added (``data.format``, ...) take their defaults where a saved
    space lacks them: the default is what the earlier release did, so the search is the same."""
    import dataclasses

    from raysearch.config import DataConfig, ResourcesConfig
    from raysearch.search.space import SchedulerConfig, SearchConfig

    for key, cls in (("data", DataConfig), ("resources", ResourcesConfig),
                     ("search", SearchConfig), ("scheduler", SchedulerConfig)):
        section = raw.get(key)
        if not isinstance(section, dict):
            continue
        for f in dataclasses.fields(cls):
            if f.name not in section and f.default is not dataclasses.MISSING:
                default = f.default
                section[f.name] = list(default) if isinstance(default, tuple) else default


def _restore_path_args(exp_dir: str) -> dict[str, Any]:
    args = ray_storage_args(exp_dir)
    out = {"path": args["storage_path"]}
    if "storage_filesystem" in args:
        out["storage_filesystem"] = args["storage_filesystem"]
    return out


def _make_tuner(spec: SearchSpace, plan: ResourcePlan, run: dict, callbacks: list, *,
                restoring: bool, retry_failed: bool = False, deadline: float | None = None):
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from raysearch.search.scheduler import make_scheduler
    from raysearch.search.searcher import (
        DefineByRun,
        MultiFidelitySearch,
        SampleBudget,
        make_sampler,
    )
    from raysearch.train.trainer import driver_resources, tune_trial_driver

    def budgeted(searcher):
        # The same chain Tune builds from max_concurrent_trials (ConcurrencyLimiter inside a
        # SearchGenerator, so a saved state restores into it), with raysearch's generator.
        limited = ConcurrencyLimiter(searcher, max_concurrent=plan.max_concurrent)
        return SampleBudget(limited, num_samples=spec.search.num_samples, deadline=deadline)

    trainable = tune.with_resources(
        tune.with_parameters(tune_trial_driver, run=run),
        driver_resources(run, driver_cpu=DRIVER_CPU),
    )
    if restoring:
        tuner = tune.Tuner.restore(
            trainable=trainable, resume_unfinished=True, resume_errored=retry_failed,
            **_restore_path_args(spec.experiment_dir),
        )
        # Callbacks are not saved with the experiment; put the live view back.
        tuner._local_tuner._run_config.callbacks = list(callbacks)
        # The saved searcher, in this run's generator: its count (a larger one extends the
        # search) and deadline. Its Optuna study is restored from searcher-state-*.pkl by Tune.
        tune_config = tuner._local_tuner._tune_config
        searcher = tune_config.search_alg
        while hasattr(searcher, "searcher"):  # SampleBudget -> ConcurrencyLimiter -> Optuna
            searcher = searcher.searcher
        tune_config.search_alg = budgeted(searcher)
        tune_config.max_concurrent_trials = None
        return tuner
    sampler = make_sampler(spec)
    searcher = MultiFidelitySearch(
        space=DefineByRun(spec.space), metric=OBJECTIVE, mode="min", sampler=sampler,
        max_epochs=spec.scheduler.max_epochs,
        points_to_evaluate=[dict(p) for p in spec.search.points_to_evaluate] or None,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE, mode="min", search_alg=budgeted(searcher),
            scheduler=make_scheduler(spec), num_samples=spec.search.num_samples,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            **ray_storage_args(spec.storage),
            failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
            callbacks=list(callbacks),
            verbose=0,
        ),
    )
