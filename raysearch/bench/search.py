"""Benchmarks, the search: ASHA + TPE against FIFO + random search, side by side, seed by seed.

``bench_search`` runs both searches on the demo data with the same number of trials, the same
rungs and the same seeds (``raysearch tune`` underneath, so the figures are the tool's own), and
prints the epochs each consumed, the best val_loss each reached, the fraction of FIFO's epochs
ASHA needed to reach FIFO's best, and the Tune/Train overhead per trial. Finished searches are
read back, so an interrupted bench resumes where it stopped.

Two replays of Ray's ASHA on FIFO's own trials put the figure in context: on the same draws
(:func:`asha_replay`, the scheduler's share of the saving), and on other random draws of the same
space (:func:`random_searcher_odds`, the odds a searcher no better than random would have).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from raysearch.bench.pipeline import demo_root
from raysearch.errors import ConfigError, ExperimentExistsError
from raysearch.experiment.schema import unix_seconds
from raysearch.storage import join, read_parquet

__all__ = ["BENCH_SCHEDULER", "BENCH_TRIALS", "bench_search"]


def _epochs_to_reach(epochs, target: float) -> int | None:
    """Epochs consumed (in reporting order) until some trial's val_loss <= target."""
    order = epochs.sort_values("reported_at")
    hits = (order["val_loss"].to_numpy() <= target + 1e-12).nonzero()[0]
    return int(hits[0]) + 1 if len(hits) else None


def asha_replay(epochs, *, max_epochs: int, grace_period: int, reduction_factor: float,
                target: float) -> dict[str, Any]:
    """Ray's ``ASHAScheduler`` with the search's rungs, replayed on FIFO + random's own trials.

    The trials start in the order FIFO started them, as many at a time as FIFO ran, and each
    epoch takes the time it took there (training, validation, checkpoint). ASHA sees each
    epoch's ``best_val_loss`` (the search's objective) and stops trials at its rungs, as in
    ``raysearch tune``. It gets the same draws, so it isolates the scheduler's share of the
    saving: how many epochs ASHA alone needs to reach ``target`` (FIFO's best) when the searcher
    proposes nothing better.
    """
    curves, concurrency = _trial_curves(epochs)
    return _replay(curves, concurrency, target=target, max_epochs=max_epochs,
                   grace_period=grace_period, reduction_factor=reduction_factor)


def random_searcher_odds(frames, *, num_samples: int, shared: int, max_epochs: int,
                         grace_period: int, reduction_factor: float, rounds: int = 1000
                         ) -> dict[str, Any] | None:
    """The bench's odds for a searcher no better than random: how hard the target is.

    ``frames`` are FIFO + random's epochs, one per seed. ASHA + TPE shares its first ``shared``
    proposals with FIFO (TPE's seeded start-up draws), so a searcher no better than random
    proposes those and then ``num_samples - shared`` other random draws: here, FIFO's trials of
    the other seeds (independent draws of the same space, each with its measured curve). Each
    round replays Ray's ASHA (as :func:`asha_replay` does) on FIFO's first ``shared`` trials
    followed by a random pick of those, and measures the fraction of FIFO's epochs it needs to
    reach FIFO's best. Drawing one round per seed gives the chance that the bench's verdict
    (every seed reaches FIFO's best, median fraction <= 1/3) would be "meets", and that the
    median alone would be within 1/3. ``None`` with one seed, or too few trials in the others.
    """
    curves = [_trial_curves(frame) for frame in frames]
    concurrency = max((c for _, c in curves), default=1)
    fresh = num_samples - shared
    rng = np.random.default_rng(0)
    fractions = np.empty((len(frames), rounds))
    for s, (own, _) in enumerate(curves):
        others = [(start, (n, tid), loss, secs) for n, (trials, _) in enumerate(curves) if n != s
                  for start, tid, loss, secs in trials]
        if not others or len(others) < fresh:
            return None
        target = min(float(c[2].min()) for c in own)
        budget = sum(len(c[2]) for c in own)
        for i in range(rounds):
            drawn = own[:shared] + [others[j] for j in rng.permutation(len(others))[:fresh]]
            r = _replay(drawn, concurrency, target=target, max_epochs=max_epochs,
                        grace_period=grace_period, reduction_factor=reduction_factor)
            fractions[s, i] = _fraction(r["epochs_needed"], budget)
    picks = fractions[np.arange(len(frames)), rng.integers(0, rounds, (20_000, len(frames)))]
    median_within = np.median(picks, axis=1) <= TARGET_FRACTION
    return {
        "rounds": rounds, "shared": shared, "fresh": fresh, "concurrency": concurrency,
        "pool": sum(len(trials) for trials, _ in curves), "seeds": len(frames),
        "p_within_target": [float(np.mean(f <= TARGET_FRACTION)) for f in fractions],
        "p_reached": [float(np.mean(np.isfinite(f))) for f in fractions],
        "median_fraction": [float(np.median(f)) for f in fractions],
        "p_median_within_target": float(median_within.mean()),
        "p_bench_meets": float((np.isfinite(picks).all(axis=1) & median_within).mean()),
    }


def _trial_curves(epochs) -> tuple[list, int]:
    """FIFO's trials as (start time, trial id, val_loss per epoch, seconds per epoch) in the
    order they started, and how many ran at a time."""
    curves = []
    spans = []  # +1 when a trial started, -1 when it ended: how many FIFO ran at a time
    for tid, g in epochs.sort_values(["trial_id", "epoch"]).groupby("trial_id", sort=False):
        # The time inside each epoch (reported_at gaps would also hold a killed driver's downtime).
        seconds = (g["epoch_time_s"] + g["val_time_s"]
                   + g.get("checkpoint_write_s", 0.0)).to_numpy(float)
        at = unix_seconds(g["reported_at"])  # time.time() of each report
        curves.append((at[0] - seconds[0], tid, g["val_loss"].to_numpy(float), seconds))
        spans += [(at[0] - seconds[0], 1), (at[-1], -1)]
    curves.sort(key=lambda c: c[0])
    return curves, max(1, int(max(np.cumsum([d for _, d in sorted(spans)]))))


def _replay(curves, concurrency: int, *, target: float, max_epochs: int, grace_period: int,
            reduction_factor: float) -> dict[str, Any]:
    """Ray's ASHA on ``curves`` (see :func:`_trial_curves`), started in list order,
    ``concurrency`` at a time."""
    import heapq
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from raysearch.search.scheduler import asha_scheduler
    from raysearch.search.tune import OBJECTIVE

    asha = asha_scheduler(max_epochs=max_epochs, grace_period=grace_period,
                          reduction_factor=reduction_factor, metric=OBJECTIVE, mode="min")
    running: list[tuple[float, int, int]] = []  # (time of its next epoch, trial, epoch index)
    started = consumed = stopped = 0
    needed, best = None, float("inf")

    def start(now: float) -> None:
        nonlocal started
        if started < len(curves):
            asha.on_trial_add(None, SimpleNamespace(trial_id=curves[started][1]))
            heapq.heappush(running, (now + curves[started][3][0], started, 0))
            started += 1

    for _ in range(concurrency):
        start(0.0)
    while running:
        now, i, k = heapq.heappop(running)
        _, tid, loss, seconds = curves[i]
        consumed += 1
        best = min(best, float(loss[k]))
        if needed is None and loss[k] <= target + 1e-12:
            needed = consumed
        trial = SimpleNamespace(trial_id=tid)
        result = {"epoch": k + 1, OBJECTIVE: float(loss[: k + 1].min())}
        action = asha.on_trial_result(None, trial, result)
        if k + 1 < len(loss) and action == TrialScheduler.CONTINUE:
            heapq.heappush(running, (now + seconds[k + 1], i, k + 1))
            continue
        if k + 1 < len(loss):
            stopped += 1
            asha.on_trial_remove(None, trial)
        else:
            asha.on_trial_complete(None, trial, result)
        start(now)
    return {"epochs": consumed, "epochs_needed": needed, "best_val_loss": best,
            "trials_at_max_epochs": len(curves) - stopped, "trials_stopped_early": stopped,
            "concurrency": concurrency}


DEMO_SPACE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "search_spaces", "demo.yaml")
# The rung structure of the real search (search_spaces/mura.yaml: ASHA 30/3/3, rungs at 3, 9 and
# 27 epochs), not the demo's quick 8/3/2: ASHA's saving grows with max_epochs / grace_period,
# and the comparison should show what a real search gets.
BENCH_SCHEDULER = {"max_epochs": 27, "grace_period": 3, "reduction_factor": 3.0}
BENCH_TRIALS = 24
TARGET_FRACTION = 1 / 3  # the target: ASHA + TPE reaches FIFO's best with <= 1/3 of its epochs


def bench_search(
    *,
    root: str | None = None,
    space: str | None = None,
    num_samples: int = BENCH_TRIALS,
    max_epochs: int = BENCH_SCHEDULER["max_epochs"],
    grace_period: int = BENCH_SCHEDULER["grace_period"],
    reduction_factor: float = BENCH_SCHEDULER["reduction_factor"],
    seeds: tuple[int, ...] = (0,),
    storage: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """ASHA + TPE against FIFO + random search on the demo data: same space, trial count, epoch
    limit and seed.

    For every search seed both searches run on one Ray instance, one after the other. The
    figure of merit is the number of epochs ASHA + TPE consumed (all trials, in the order they
    were reported) until some trial's val_loss was at least as low as the best val_loss FIFO +
    random reached with all of its epochs, as a fraction of FIFO's epochs. ``points_to_evaluate``
    is dropped: random search does not get the hand-picked start either, and trial-level early
    stopping is off in both searches (see :func:`_bench_base`). ``storage`` keeps the
    experiments (``<storage>/fifo-random-seed<S>``, ``asha-tpe-seed<S>``; by default they go to a
    temporary folder), and running the bench again with the same ``storage`` continues them the
    way ``raysearch tune`` resumes: finished searches are read back, not re-run, so a multi-hour
    comparison survives a killed driver. The wall times cover only the invocation that printed
    them.
    """
    from raysearch.search.searcher import tpe_startup_trials

    console = console or Console()
    space = space or DEMO_SPACE
    data_root, tmp = demo_root(root, console)
    work = tempfile.TemporaryDirectory(prefix="raysearch-bench-search-")
    out = storage or work.name
    rows: list[dict[str, Any]] = []
    fifo_frames = []
    try:
        base = _bench_base(space, data_root=data_root, out=out, num_samples=num_samples,
                           max_epochs=max_epochs, grace_period=grace_period,
                           reduction_factor=reduction_factor)
        for i, seed in enumerate(seeds):
            # The arms take turns (A B, B A, ...): a change in the machine's load over a long
            # bench weighs on both arms' wall times alike.
            arms = list(_search_arms(base, seed).items())
            runs = {label: _measure_search(spec, console=console)
                    for label, spec in (arms if i % 2 == 0 else arms[::-1])}
            fifo, asha = runs["fifo+random"], runs["asha+tpe"]
            needed = _epochs_to_reach(asha.pop("epoch_frame"), fifo["best_val_loss"])
            fifo_frames.append(fifo.pop("epoch_frame"))
            replay = asha_replay(
                fifo_frames[-1], target=fifo["best_val_loss"],
                max_epochs=base.scheduler.max_epochs, grace_period=base.scheduler.grace_period,
                reduction_factor=base.scheduler.reduction_factor,
            )
            rows.append({
                "seed": seed, "fifo": fifo, "asha": asha, "epochs_needed": needed,
                # Not reached counts as worse than any fraction, so the median stays honest.
                "fraction": _fraction(needed, fifo["epochs"]),
                "replay": {**replay, "fraction": _fraction(replay["epochs_needed"], fifo["epochs"])},
            })
            console.print(_seed_line(rows[-1]))  # a seed takes hours on a CPU: say it now
    finally:
        work.cleanup()
        if tmp is not None:
            tmp.cleanup()
    result = {
        "num_samples": base.search.num_samples,
        "scheduler": dataclasses.asdict(base.scheduler),
        "seeds": rows,
        "median_fraction": float(np.median([r["fraction"] for r in rows])),
        "reached": sum(r["epochs_needed"] is not None for r in rows),
        "median_replay_fraction": float(np.median([r["replay"]["fraction"] for r in rows])),
        "random_searcher": random_searcher_odds(
            fifo_frames, num_samples=base.search.num_samples,
            shared=tpe_startup_trials(base), max_epochs=base.scheduler.max_epochs,
            grace_period=base.scheduler.grace_period,
            reduction_factor=base.scheduler.reduction_factor,
        ),
    }
    _print_search(console, result)
    return result


def _fraction(needed: int | None, total: int) -> float:
    return needed / total if needed is not None else float("inf")


def _bench_base(space: str, *, data_root: str, out: str, num_samples: int, max_epochs: int,
                grace_period: int, reduction_factor: float):
    """The search space both searches share: the file's, with the bench's rungs, no
    ``points_to_evaluate``, the decode-once cache under ``out`` and no trial-level early stopping.

    Patience is off so that FIFO means "every trial to the end" and the scheduler is the only
    thing that stops trials. With it (demo space, patience 4 of 27 epochs) every FIFO trial ended
    before 27 epochs and every trial ASHA promoted past 9 epochs ended at 13, on the noise of
    single epochs and before its cosine schedule annealed: the comparison measured patience as
    much as the scheduler.
    """
    from raysearch.search.space import load_search_space

    base = load_search_space(space, data_root=data_root, storage=out, num_samples=num_samples)
    return dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, cache_dir=join(out, "cache")),
        search=dataclasses.replace(base.search, points_to_evaluate=()),
        scheduler=dataclasses.replace(  # validates the bounds, as the file would
            base.scheduler, max_epochs=max_epochs, grace_period=grace_period,
            reduction_factor=reduction_factor,
        ),
        trial={**base.trial, "early_stop_patience": max_epochs + 1},
        space=tuple(p for p in base.space if p.name != "early_stop_patience"),
    )


def _search_arms(base, seed: int) -> dict[str, Any]:
    """The two searches of one seed (from :func:`_bench_base`); they differ only in searcher and
    scheduler."""
    return {
        label: dataclasses.replace(
            base,
            name=f"{label.replace('+', '-')}-seed{seed}",
            search=dataclasses.replace(base.search, algorithm=algorithm, seed=seed),
            scheduler=dataclasses.replace(base.scheduler, kind=kind),
        )
        for label, algorithm, kind in (("fifo+random", "random", "fifo"),
                                       ("asha+tpe", "tpe", "asha"))
    }


def _trial_clock():
    """A ``ray.tune.Callback`` that notes, in the driver, the wall times (Unix seconds) at which
    each trial first appears in the controller's trial list (``created_at``: the moment the
    searcher proposed it, which under the concurrency limit is the moment its slot was given
    back by the trial before it) and at which Tune ends it (``ended_at``: completed, stopped by
    the scheduler, or failed). Both map trial ids to times. Trials restored from an earlier run
    (ended, or resuming from a checkpoint) are left out. Resolution: one controller step (well
    under a second)."""
    from ray.tune import Callback

    class TrialClock(Callback):
        def __init__(self) -> None:
            self.created_at: dict[str, float] = {}
            self.ended_at: dict[str, float] = {}
            self._known: set[str] = set()

        def _see(self, trials) -> None:
            now = time.time()
            for t in trials:
                if t.trial_id in self._known:
                    continue
                self._known.add(t.trial_id)
                # a new trial, not one restored from an earlier run (ended, or resuming from a
                # checkpoint, its first epoch long past)
                if t.status == "PENDING" and not t.has_reported_at_least_once:
                    self.created_at[t.trial_id] = now

        def on_step_begin(self, iteration, trials, **info):
            self._see(trials)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._see(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            if trial.trial_id in self.created_at:
                self.ended_at.setdefault(trial.trial_id, time.time())

        def on_trial_error(self, iteration, trials, trial, **info):
            if trial.trial_id in self.created_at:
                self.ended_at.setdefault(trial.trial_id, time.time())

    return TrialClock()


def _measure_search(spec, *, console) -> dict[str, Any]:
    """Run one search; its epochs, best val_loss, wall time and Tune/Train overhead per trial."""
    from raysearch.search.tune import run_search

    clock = _trial_clock()
    t0 = time.perf_counter()
    try:
        # an existing experiment of this spec resumes
        exp = run_search(spec, console=console, callbacks=(clock,))
    except ExperimentExistsError as e:  # tune's hint names tune's flags, which bench lacks
        raise ConfigError(
            f"bench search: {e.experiment_dir} holds a {spec.name!r} search with other settings "
            "(space, trials, rungs); delete it or pass another --storage"
        ) from None
    wall = time.perf_counter() - t0
    trials = read_parquet(join(exp, "trials.parquet"))
    epochs = read_parquet(join(exp, "epochs.parquet"))
    overhead = trial_overheads(trials, epochs, created_at=clock.created_at,
                               ended_at=clock.ended_at)
    return {
        "epochs": len(epochs),
        "best_val_loss": float(epochs["val_loss"].min()),
        "trials_stopped_early": int(trials["status"].isin(["pruned", "early_stopped"]).sum()),
        "trials_at_max_epochs": int((trials["status"] == "completed").sum()),
        "wall_s": wall,
        "overhead_per_trial_s": _median(overhead["outside_epochs_s"]),
        "before_first_epoch_s": _median(overhead["before_first_epoch_s"]),
        # trials resumed from an earlier run were created then, and have no creation time here
        "created_to_first_epoch_s": _median(overhead["created_to_first_epoch_s"].dropna()),
        "slot_outside_epochs_s": _median(overhead["slot_outside_epochs_s"].dropna()),
        "epoch_frame": epochs,
    }


def trial_overheads(trials, epochs, *, created_at: dict[str, float] | None = None,
                    ended_at: dict[str, float] | None = None):
    """Per trial, in seconds: ``before_first_epoch_s``, from the trial's start (its Tune
    trainable set up, in the driver process) to the start of its first epoch: the Ray Train
    controller and worker processes, data and model set-up; ``outside_epochs_s``, all of its
    wall time outside its training and validation loops (that, plus checkpoints, reports and the
    end); and ``created_to_first_epoch_s``, from the trial's creation (``created_at``: trial id
    to Unix seconds, from :func:`_trial_clock`) to the start of its first epoch: everything the
    trial's slot waited for, the start of the trial's driver process and its imports included;
    and ``slot_outside_epochs_s``, from its creation to its end as Tune saw it (``ended_at``)
    less its training and validation loops: the whole per-trial overhead of the search, the
    previous trial's tear-down (which the next trial's creation waits for) included. The last
    two are NaN for a trial without those times. ``trials``/``epochs``:
    ``trials.parquet``/``epochs.parquet`` rows. Returns a DataFrame indexed by trial id.

    A trial's start is its last report's time less its wall time (Tune's ``time_total_s``,
    counted from the trainable's start); its first epoch's start is that epoch's report time
    less its training and validation time. ``before_first_epoch_s`` and ``outside_epochs_s``
    leave out the driver process's own start, before Tune's clock runs;
    ``created_to_first_epoch_s`` does not.
    """
    import pandas as pd

    ordered = epochs.sort_values(["trial_id", "epoch"])
    per = ordered.groupby("trial_id")
    first, last = per.first(), per.last()
    wall = trials.set_index("trial_id")["wall_time_s"].reindex(first.index)
    ckpt_last = last["checkpoint_write_s"].fillna(0.0) if "checkpoint_write_s" in last else 0.0
    # reported_at: a timestamp (or an earlier release's float seconds), as Unix seconds
    last_at = pd.Series(unix_seconds(last["reported_at"]), index=last.index)
    first_at = pd.Series(unix_seconds(first["reported_at"]), index=first.index)
    start = last_at + ckpt_last - wall
    first_epoch = first_at - first["val_time_s"] - first["epoch_time_s"]
    in_loop = per[["epoch_time_s", "val_time_s"]].sum().sum(axis=1)
    created = pd.Series(created_at or {}, dtype=float).reindex(first.index)
    ended = pd.Series(ended_at or {}, dtype=float).reindex(first.index)
    return pd.DataFrame({"before_first_epoch_s": first_epoch - start,
                         "outside_epochs_s": wall - in_loop,
                         "created_to_first_epoch_s": first_epoch - created,
                         "slot_outside_epochs_s": ended - created - in_loop,
                         }).dropna(subset=["before_first_epoch_s", "outside_epochs_s"])


def _median(values) -> float:
    values = [float(v) for v in values]
    return float(np.median(values)) if values else float("nan")


def _secs(value) -> str:
    """Seconds to one decimal; "-" for a figure the run could not measure (resumed trials)."""
    return "-" if value is None or not np.isfinite(value) else f"{value:.1f}"


def _seed_line(row: dict[str, Any]) -> str:
    fifo, asha = row["fifo"], row["asha"]
    if row["epochs_needed"] is None:
        reach = (f"did not reach it (best {asha['best_val_loss']:.4f} with all of its "
                 f"{asha['epochs']} epochs)")
    else:
        reach = (f"reached it after {row['epochs_needed']} epochs = {row['fraction']:.2f} of "
                 f"FIFO's ({asha['epochs']} in all)")
    replay = row["replay"]
    alone = ("would not have reached it" if replay["epochs_needed"] is None else
             f"would have reached it after {replay['epochs_needed']} = {replay['fraction']:.2f}")
    return (f"bench search, seed {row['seed']}: FIFO+random best val_loss "
            f"{fifo['best_val_loss']:.4f} with {fifo['epochs']} epochs; ASHA+TPE {reach}; "
            f"ASHA alone on FIFO's own trials {alone}")


def _print_search(console: Console, r: dict[str, Any]) -> None:
    sch = r["scheduler"]
    table = Table(
        title=f"bench search: {r['num_samples']} trials per search, max {sch['max_epochs']} epochs,"
        f" ASHA grace {sch['grace_period']} / reduction {sch['reduction_factor']:g}, "
        f"{os.cpu_count()} cores",
        title_justify="left",
    )
    for col in ("seed", "search", "epochs", "best val_loss", "to max / stopped", "wall (s)",
                "to 1st epoch (s) trial / slot", "outside epochs (s) trial / slot",
                "ASHA+TPE epochs to FIFO's best"):
        table.add_column(col, justify="left" if col == "search" else "right")
    for row in r["seeds"]:
        for label, run in (("fifo+random", row["fifo"]), ("asha+tpe", row["asha"])):
            reach = ""
            if label == "asha+tpe":
                reach = _reach(row["epochs_needed"], row["fraction"])
            table.add_row(
                str(row["seed"]), label, str(run["epochs"]), f"{run['best_val_loss']:.4f}",
                f"{run['trials_at_max_epochs']} / {run['trials_stopped_early']}",
                f"{run['wall_s']:.0f}",
                f"{run['before_first_epoch_s']:.1f} / {_secs(run.get('created_to_first_epoch_s'))}",
                f"{run['overhead_per_trial_s']:.1f} / {_secs(run.get('slot_outside_epochs_s'))}",
                reach,
            )
        replay = row["replay"]
        table.add_row(
            str(row["seed"]), "asha replay on fifo's trials", str(replay["epochs"]),
            f"{replay['best_val_loss']:.4f}",
            f"{replay['trials_at_max_epochs']} / {replay['trials_stopped_early']}",
            "", "", "", _reach(replay["epochs_needed"], replay["fraction"]),
        )
    console.print(table)
    console.print(
        "per trial, medians: 'to 1st epoch' from the trial's start in its Tune driver (trial) "
        "or from its creation, when its slot came free (slot: the driver process's start and "
        "imports included), to its first epoch; 'outside epochs' all of its time outside its "
        "training and validation loops, in the trial or from its creation to its end in the "
        "slot (target: 10 s or less). One-worker trials run inline in their driver "
        "(RAYSEARCH_INLINE_TRIALS=0: through Ray Train)"
    )
    n = len(r["seeds"])
    verdict = ("meets" if r["reached"] == n and r["median_fraction"] <= TARGET_FRACTION
               else "misses")
    console.print(
        f"ASHA+TPE reached FIFO+random's best val_loss in {r['reached']} of {n} seed(s); median "
        f"fraction of FIFO's epochs {r['median_fraction']:.2f}{_spread(r['seeds'])} "
        f"({verdict} the <= 1/3 target)"
    )
    console.print(
        "Ray's ASHA alone, replayed on FIFO+random's own trials (same draws, their epoch times), "
        f"needs a median {r['median_replay_fraction']:.2f} of FIFO's epochs: the scheduler's "
        "share of the saving; the rest is up to the searcher"
    )
    odds = r["random_searcher"]
    if odds is None:
        console.print("(with two seeds or more the bench also gives the odds of a searcher no "
                      "better than random)")
        return
    def per_seed(key: str) -> str:
        return " / ".join(f"{p:.0%}" for p in odds[key])

    console.print(
        f"A searcher no better than random (Ray's ASHA on FIFO's {odds['shared']} start-up draws "
        f"that ASHA+TPE shares, then {odds['fresh']} of the other seeds' FIFO trials; "
        f"{odds['rounds']} rounds per seed): within 1/3 of FIFO's epochs in "
        f"{per_seed('p_within_target')} of runs, FIFO's best reached at all in "
        f"{per_seed('p_reached')}; over {odds['seeds']} seeds the median fraction would be within "
        f"1/3 with probability {odds['p_median_within_target']:.2f}, and the verdict (every seed "
        f"reaching it, too) \"meets\" with probability {odds['p_bench_meets']:.2f}"
    )



def _spread(rows) -> str:
    """' (range 0.25-0.53 over 3 seeds)': the spread of the per-seed fractions."""
    fractions = [r["fraction"] for r in rows]
    if len(fractions) < 2:
        return ""
    high = max(fractions)
    return (f" (range {min(fractions):.2f}-" + ("not reached" if high == float("inf") else
                                                f"{high:.2f}") + f" over {len(fractions)} seeds)")


def _reach(needed: int | None, fraction: float) -> str:
    return "not reached" if needed is None else f"{needed} = {fraction:.2f} of FIFO's"
