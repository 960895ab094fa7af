"""Bench: the search comparison's bookkeeping, and one real (tiny) side-by-side run."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from rich.console import Console

from raysearch.bench import _epochs_to_reach


def test_epochs_to_reach_counts_every_trial_in_reporting_order():
    epochs = pd.DataFrame({
        "trial_id": ["a", "b", "a", "b", "a"],
        "val_loss": [0.70, 0.65, 0.60, 0.50, 0.55],
        "reported_at": [1.0, 2.0, 3.0, 4.0, 5.0],
    }).sample(frac=1.0, random_state=0)  # order in the file must not matter
    assert _epochs_to_reach(epochs, 0.65) == 2
    assert _epochs_to_reach(epochs, 0.50) == 4
    assert _epochs_to_reach(epochs, 0.49) is None


TINY_SPACE = """
name: bench
data: {{root: {root}, val_fraction: 0.2, seed: 0}}
resources: {{workers_per_trial: 1, max_concurrent: 2, max_failures: 0}}
search: {{algorithm: tpe, seed: 0, num_samples: 3}}
scheduler: {{kind: asha, max_epochs: 3, grace_period: 1, reduction_factor: 3}}
storage: unused
trial: {{weights: none, batch_size: 16, image_size: 32, arch: mobilenet_v3_small, augment: none}}
space:
  lr: {{loguniform: [0.0005, 0.01]}}
"""


@pytest.mark.slow
def test_bench_search_runs_both_searches_side_by_side(tmp_path, tiny_root, ray_session):
    from raysearch.bench import bench_search

    space = tmp_path / "bench.yaml"
    space.write_text(TINY_SPACE.format(root=tiny_root))
    out = io.StringIO()
    r = bench_search(root=tiny_root, space=str(space), num_samples=3, max_epochs=3,
                     grace_period=1, reduction_factor=3, console=Console(file=out, width=200))
    (row,) = r["seeds"]
    fifo, asha = row["fifo"], row["asha"]
    # FIFO trains every trial to the end unless a trial stops itself (patience is 5 > 3 epochs).
    assert fifo["epochs"] == 3 * 3 and fifo["trials_at_max_epochs"] == 3
    assert 3 <= asha["epochs"] <= 9
    if row["epochs_needed"] is None:
        assert asha["best_val_loss"] > fifo["best_val_loss"]
    else:
        assert 1 <= row["epochs_needed"] <= asha["epochs"]
        assert row["fraction"] == pytest.approx(row["epochs_needed"] / fifo["epochs"])
    text = out.getvalue()
    assert "fifo+random" in text and "asha+tpe" in text and "target" in text
