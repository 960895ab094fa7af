"""Bench: the search comparison's bookkeeping, and one real (tiny) side-by-side run."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from raysearch.bench.search import _epochs_to_reach, asha_replay, random_searcher_odds
from raysearch.errors import ConfigError


def test_epochs_to_reach_counts_every_trial_in_reporting_order():
    epochs = pd.DataFrame({
        "trial_id": ["a", "b", "a", "b", "a"],
        "val_loss": [0.70, 0.65, 0.60, 0.50, 0.55],
        "reported_at": [1.0, 2.0, 3.0, 4.0, 5.0],
    }).sample(frac=1.0, random_state=0)  # order in the file must not matter
    assert _epochs_to_reach(epochs, 0.65) == 2
    assert _epochs_to_reach(epochs, 0.50) == 4
    assert _epochs_to_reach(epochs, 0.49) is None


def _curves(losses: dict[str, list[float]]) -> pd.DataFrame:
    """FIFO's epochs frame for trials run one after the other, one second per epoch."""
    rows, now = [], 0.0
    for tid, curve in losses.items():
        for epoch, loss in enumerate(curve, 1):
            now += 1.0
            rows.append({"trial_id": tid, "epoch": epoch, "val_loss": loss, "reported_at": now,
                         "epoch_time_s": 0.75, "val_time_s": 0.25, "checkpoint_write_s": 0.0})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)


def test_asha_replay_runs_rays_asha_on_fifos_own_trials():
    ramp = [0.9, 0.8, 0.7, 0.65, 0.6, 0.6, 0.58, 0.56, 0.55]
    epochs = _curves({
        "a": ramp,  # first at both rungs: goes on to 9
        "b": [0.95, 0.9, 0.85] + [0.5] * 6,  # worse than a at 3: stopped there
        "c": [0.8, 0.7, 0.6, 0.55, 0.5, 0.48, 0.45, 0.42, 0.40],  # best at 3 and at 9
        "d": [0.99, 0.95, 0.9] + [0.3] * 6,  # the best trial, but stopped at 3
    })
    kwargs = {"max_epochs": 9, "grace_period": 3, "reduction_factor": 3.0}
    r = asha_replay(epochs, target=0.40, **kwargs)
    assert r == {"epochs": 9 + 3 + 9 + 3, "epochs_needed": 9 + 3 + 9, "best_val_loss": 0.40,
                 "trials_at_max_epochs": 2, "trials_stopped_early": 2, "concurrency": 1}
    assert asha_replay(epochs, target=0.30, **kwargs)["epochs_needed"] is None  # d never got there


def test_asha_replay_runs_as_many_trials_at_a_time_as_fifo_did():
    two = _curves({"a": [0.9, 0.8, 0.7], "b": [0.9, 0.8, 0.6]})
    two["reported_at"] = two["epoch"].astype(float)  # a and b ran side by side
    r = asha_replay(two, target=0.6, max_epochs=3, grace_period=1, reduction_factor=3.0)
    assert r["concurrency"] == 2
    assert r["epochs_needed"] == 6  # b's last epoch comes after a's


def test_random_searcher_odds_replay_the_shared_draws_then_other_seeds_trials():
    # Two seeds, three trials each with flat curves, FIFO two at a time: a (0.7) and b (0.1)
    # side by side, then c (0.4). A random searcher proposes a seed's own first trial (the shared
    # start-up draw) and then two of the other seed's three. It reaches FIFO's best (0.1) only if
    # it drew the other b (2 in 3), within 1/3 of FIFO's 9 epochs only if b came first (1 in 3):
    # b's first epoch is the 2nd. Drawn second it starts when a trial ends at epoch 3 (ASHA's
    # rung at 1 keeps both, each the best so far): the 7th epoch. Over two seeds the median is
    # the mean of two, within 1/3 only if both were 2/9: 1 in 9.
    def seed():
        frame = _curves({"a": [0.7] * 3, "b": [0.1] * 3, "c": [0.4] * 3})
        frame["reported_at"] = frame["epoch"] + 3.0 * (frame["trial_id"] == "c")
        return frame

    kwargs = {"num_samples": 3, "shared": 1, "max_epochs": 3, "grace_period": 1,
              "reduction_factor": 3.0}
    odds = random_searcher_odds([seed(), seed()], **kwargs, rounds=3000)
    assert odds["pool"] == 6 and odds["concurrency"] == 2 and odds["fresh"] == 2
    for p_reached, p_within in zip(odds["p_reached"], odds["p_within_target"]):
        assert p_reached == pytest.approx(2 / 3, abs=0.04)
        assert p_within == pytest.approx(1 / 3, abs=0.04)
    assert odds["median_fraction"] == [pytest.approx(7 / 9)] * 2
    assert odds["p_median_within_target"] == pytest.approx(1 / 9, abs=0.03)
    assert odds["p_bench_meets"] == odds["p_median_within_target"]
    # The shared draws are the seed's own first trials: sharing b (0.1) reaches at its 1st epoch.
    first_b = [seed().replace({"trial_id": {"a": "b", "b": "a"}}) for _ in range(2)]
    odds = random_searcher_odds(first_b, **kwargs, rounds=50)
    assert odds["p_within_target"] == [1.0, 1.0] and odds["p_bench_meets"] == 1.0
    assert random_searcher_odds([seed()], **kwargs) is None  # no other seed to draw from


TINY_SPACE = """
name: bench
data: {{root: {root}, val_fraction: 0.2, seed: 0}}
resources: {{workers_per_trial: 1, max_concurrent: 2, max_failures: 0}}
search: {{algorithm: tpe, seed: 0, num_samples: 3}}
scheduler: {{kind: asha, max_epochs: 3, grace_period: 1, reduction_factor: 3}}
storage: unused
trial: {{weights: none, batch_size: 16, image_size: 32, arch: mobilenet_v3_small, augment: none,
        early_stop_patience: 1}}
space:
  lr: {{loguniform: [0.0005, 0.01]}}
"""


@pytest.mark.slow
@pytest.mark.bench
def test_bench_search_runs_both_searches_side_by_side(tmp_path, tiny_root, ray_session):
    from raysearch.bench.search import bench_search

    space = tmp_path / "bench.yaml"
    space.write_text(TINY_SPACE.format(root=tiny_root))
    out = io.StringIO()
    kwargs = {"root": tiny_root, "space": str(space), "num_samples": 3, "max_epochs": 3,
              "grace_period": 1, "reduction_factor": 3, "storage": str(tmp_path / "kept")}
    r = bench_search(**kwargs, console=Console(file=out, width=200))
    (row,) = r["seeds"]
    fifo, asha = row["fifo"], row["asha"]
    # FIFO trains every trial to the end: the bench turns the space's patience of 1 off.
    assert fifo["epochs"] == 3 * 3 and fifo["trials_at_max_epochs"] == 3
    assert 3 <= asha["epochs"] <= 9
    if row["epochs_needed"] is None:
        assert asha["best_val_loss"] > fifo["best_val_loss"]
    else:
        assert 1 <= row["epochs_needed"] <= asha["epochs"]
        assert row["fraction"] == pytest.approx(row["epochs_needed"] / fifo["epochs"])
    # ASHA replayed on FIFO's own three trials: the rung at epoch 1 keeps the first, so at
    # least 3 + 1 + 1 epochs; FIFO's best is among them, but it may be stopped before it.
    replay = row["replay"]
    assert 5 <= replay["epochs"] <= 9 and replay["concurrency"] in (1, 2)
    assert replay["best_val_loss"] >= fifo["best_val_loss"]
    assert (replay["epochs_needed"] is None) == (replay["best_val_loss"] > fifo["best_val_loss"])
    for run in (fifo, asha):  # the driver's clock saw every trial: the slot holds the trial
        assert 0 < run["before_first_epoch_s"] <= run["created_to_first_epoch_s"]
        assert run["overhead_per_trial_s"] <= run["slot_outside_epochs_s"]
    text = out.getvalue()
    assert "fifo+random" in text and "asha+tpe" in text and "target" in text
    assert "asha replay on fifo's trials" in text and "ASHA alone on FIFO's own trials" in text
    assert r["random_searcher"] is None and "with two seeds or more" in text
    seed_line = next(ln for ln in text.splitlines() if ln.startswith("bench search, seed 0:"))
    assert f"{fifo['best_val_loss']:.4f} with 9 epochs" in seed_line
    assert ("did not reach" if row["epochs_needed"] is None else "reached it after") in seed_line

    # Run again on the kept experiments: both searches are read back, not trained again.
    files = [tmp_path / "kept" / name / "epochs.parquet"
             for name in ("fifo-random-seed0", "asha-tpe-seed0")]
    before = [pd.read_parquet(f) for f in files]
    again = bench_search(**kwargs, console=Console(file=io.StringIO(), width=200))
    (row2,) = again["seeds"]
    assert row2["epochs_needed"] == row["epochs_needed"]
    # read back, not run: no trial was created in this run, so no slot figures
    assert np.isnan(row2["fifo"]["created_to_first_epoch_s"])
    for key in ("fifo", "asha"):
        assert row2[key]["epochs"] == row[key]["epochs"]
        assert row2[key]["best_val_loss"] == row[key]["best_val_loss"]
    for f, old in zip(files, before):
        pd.testing.assert_series_equal(pd.read_parquet(f)["reported_at"], old["reported_at"])


def _tiny_base(tmp_path, tiny_root, *, points: str | None = None):
    """The bench's shared spec from TINY_SPACE (5 trials, rungs 1/3/9, out = tmp_path/out)."""
    from raysearch.bench.search import _bench_base

    text = TINY_SPACE.format(root=tiny_root)
    if points:
        text = text.replace("num_samples: 3}", f"num_samples: 3, points_to_evaluate: {points}}}")
    space = tmp_path / "bench.yaml"
    space.write_text(text)
    return _bench_base(str(space), data_root=tiny_root, out=str(tmp_path / "out"),
                       num_samples=5, max_epochs=9, grace_period=1, reduction_factor=3)


def test_bench_arms_differ_only_in_searcher_and_scheduler(tmp_path, tiny_root):
    from raysearch.bench.search import _search_arms

    arms = _search_arms(_tiny_base(tmp_path, tiny_root, points="[{lr: 0.001}]"), seed=7)
    assert list(arms) == ["fifo+random", "asha+tpe"]
    fifo, asha = arms["fifo+random"], arms["asha+tpe"]
    assert (fifo.search.algorithm, fifo.scheduler.kind) == ("random", "fifo")
    assert (asha.search.algorithm, asha.scheduler.kind) == ("tpe", "asha")
    for spec in (fifo, asha):
        assert spec.search.seed == 7 and spec.search.num_samples == 5
        assert spec.search.points_to_evaluate == ()  # random search gets no hand-picked start
        assert spec.scheduler.max_epochs == 9 and spec.scheduler.grace_period == 1
        # The file's patience of 1 is off: no trial stops itself before max_epochs.
        assert spec.trial_config({"lr": 1e-3}).early_stop_patience > 9
        assert spec.data.cache_dir == str(tmp_path / "out" / "cache")
    assert fifo.trial == asha.trial and fifo.space == asha.space
    assert fifo.name == "fifo-random-seed7" and asha.name == "asha-tpe-seed7"


def test_bench_on_a_kept_experiment_of_other_settings_names_storage(tmp_path, tiny_root):
    from raysearch.bench.search import _measure_search, _search_arms

    out = tmp_path / "out"
    fifo = _search_arms(_tiny_base(tmp_path, tiny_root), seed=7)["fifo+random"]
    kept = out / fifo.name  # a kept experiment of the same name, from a run with other settings
    kept.mkdir(parents=True)
    (kept / "experiment.json").write_text("{}")  # raysearch's marker, written before Ray's files
    (kept / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    (kept / "search_space.yaml").write_text("name: fifo-random-seed7\n")
    with pytest.raises(ConfigError, match=r"bench search: .*fifo-random-seed7 holds .* another --storage"):
        _measure_search(fifo, console=Console(file=io.StringIO()))


def test_trial_overheads_split_the_time_before_the_first_epoch_from_the_rest():
    from raysearch.bench.search import trial_overheads

    # Trainable starts at t=100; the first epoch starts at 130 (30 s of set-up), each epoch
    # trains 8 s and validates 2 s, checkpoints take 1 s; the trial ends at 155 (3 epochs).
    epochs = pd.DataFrame({
        "trial_id": ["a"] * 3, "epoch": [3, 1, 2],
        "reported_at": [162.0, 140.0, 151.0], "epoch_time_s": [8.0] * 3,
        "val_time_s": [2.0] * 3, "checkpoint_write_s": [1.0] * 3,
    })
    trials = pd.DataFrame({"trial_id": ["a", "b"], "wall_time_s": [63.0, 11.0]})
    epochs = pd.concat([epochs, pd.DataFrame({  # b: resumed, created in an earlier run
        "trial_id": ["b"], "epoch": [1], "reported_at": [20.0], "epoch_time_s": [8.0],
        "val_time_s": [2.0], "checkpoint_write_s": [1.0]})])
    # a was created at t=88 (its driver process took 12 s to start and import), and Tune saw
    # it end at t=165 (3 s after its last report)
    out = trial_overheads(trials, epochs, created_at={"a": 88.0}, ended_at={"a": 165.0})
    assert out.loc["a", "before_first_epoch_s"] == pytest.approx(30.0)
    assert out.loc["a", "outside_epochs_s"] == pytest.approx(33.0)
    assert out.loc["a", "created_to_first_epoch_s"] == pytest.approx(42.0)
    assert out.loc["a", "slot_outside_epochs_s"] == pytest.approx(165.0 - 88.0 - 30.0)
    assert out.loc["b", "before_first_epoch_s"] == pytest.approx(0.0)
    assert np.isnan(out.loc["b", "created_to_first_epoch_s"])
    assert np.isnan(out.loc["b", "slot_outside_epochs_s"])
    # without the clock (an older caller): the trainable-side figures alone
    alone = trial_overheads(trials, epochs)
    assert alone.loc["a", "outside_epochs_s"] == pytest.approx(33.0)
    assert alone["created_to_first_epoch_s"].isna().all()


def test_the_search_bench_prints_the_spread_over_seeds():
    from raysearch.bench.search import _spread

    assert _spread([{"fraction": 0.25}]) == ""
    rows = [{"fraction": 0.25}, {"fraction": float("inf")}, {"fraction": 0.53}]
    assert _spread(rows) == " (range 0.25-not reached over 3 seeds)"
    assert _spread(rows[::2]) == " (range 0.25-0.53 over 2 seeds)"
