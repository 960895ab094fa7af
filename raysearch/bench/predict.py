"""Benchmark, prediction: ``raysearch predict`` on the test split of an experiment (the demo's by
default) against the pure forward passes of the same members on the same tensors.

The predict arm is the whole command: list the files, read and decode each PNG (threads), run
every member, aggregate studies, write the outputs. The pure arm runs only ``model(x)`` and the
sigmoid for every member, on input tensors built beforehand from the same images, with the same
batch size, device, autocast and memory format. Their ratio (predict's images per second over the
pure arm's) says how much of the models' own speed the command keeps. The arms alternate in
rounds (ABBA...) so that a change of load on a shared machine falls on both, and the median of
the paired ratios is reported with its range. No Ray.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch

from raysearch.bench.paired import alternate, paired_ratio
from raysearch.errors import ConfigError, DataError

__all__ = ["bench_predict"]


def _test_split(source: str):
    """The test images of the experiment that ``source`` (an ensemble or experiment folder)
    belongs to: its manifest's ``split == "test"`` rows."""
    from raysearch.experiment import MARKER, read_manifest
    from raysearch.storage import exists, join

    exp = source.rstrip("/")
    if not exists(join(exp, MARKER)):
        exp = exp.rsplit("/", 1)[0]
    if not exists(join(exp, MARKER)):
        raise ConfigError(f"{source} is not inside an experiment: bench predict needs its manifest")
    manifest = read_manifest(exp)
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    if test.empty:
        raise DataError(f"experiment {exp} has no test images")
    return test


def bench_predict(
    *,
    ensemble: str | None = None,
    storage: str = "reports",
    rounds: int = 4,
    batch_size: int = 64,
    device: str | None = None,
    console=None,
) -> dict[str, Any]:
    """Images per second of ``raysearch predict`` and of the pure forward passes, ``rounds``
    times each (after one untimed warm-up of each), and the median ratio predict / pure with its
    range. ``ensemble``: an ensemble or experiment folder (default: the most recent experiment
    under ``storage``). Raises :class:`ConfigError` / :class:`DataError` for a folder without
    members or test images."""
    from rich.console import Console

    from raysearch.data.images import preprocess_image_sizes
    from raysearch.experiment import find_experiment
    from raysearch.inference.predict import run_predict
    from raysearch.inference.predictor import Predictor, autocast_for

    console = console or Console()
    if rounds < 1 or batch_size < 1:
        raise ConfigError("--rounds and --batch-size must be >= 1")
    source = ensemble or find_experiment(None, storage=storage)
    predictor = Predictor.from_dir(source, device=device, batch_size=batch_size)
    test = _test_split(source)
    paths = test["image_path"].tolist()
    n = len(paths)

    # --- the pure arm's inputs: every test image, at every member's size, as the model input
    sizes = sorted({m.config.image_size for m in predictor.members})
    decoded = [preprocess_image_sizes(p, image_sizes=sizes) for p in paths]
    inputs: dict[str, list[torch.Tensor]] = {}
    for m in predictor.members:
        s = m.config.image_size
        u8 = torch.from_numpy(np.stack([d[s] for d in decoded])).unsqueeze(1)
        augment = predictor._augment(m)
        inputs[m.trial_id] = [augment.eval_batch(u8[i:i + batch_size].to(predictor.device))
                              for i in range(0, n, batch_size)]
        predictor.model(m)
    ctx, _ = autocast_for(predictor.device)

    def pure() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for m in predictor.members:
                model = predictor.model(m)
                for x in inputs[m.trial_id]:
                    with ctx:
                        torch.sigmoid(model(x).float()).cpu()
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory(prefix="raysearch-bench-predict-") as tmp:
        listing = os.path.join(tmp, "test.csv")
        test[["image_path", "study_id", "patient_id"]].to_csv(listing, index=False)
        quiet = Console(file=open(os.devnull, "w"), width=100)  # noqa: SIM115 - closed below

        def whole() -> float:
            start = time.perf_counter()
            run_predict([listing], ensemble=source, out=os.path.join(tmp, "out"),
                        batch_size=batch_size, console=quiet)
            return n / (time.perf_counter() - start)

        try:
            whole(), pure()  # warm-up: the first model loads, caches and allocations
            # (pure, predict) per round, the order swapping every round
            pairs = alternate(lambda _: pure(), lambda _: whole(), rounds=rounds)
        finally:
            quiet.file.close()
    ratio = paired_ratio(pairs, ceiling=1.0,
                         impossible="the whole command cannot be faster than its forward passes")
    result = {
        "ensemble": source, "device": predictor.device.type, "members": len(predictor.members),
        "images": n, "batch_size": batch_size, "cores": os.cpu_count(),
        "predict_images_per_s": statistics.median(b for _, b in pairs),
        "pure_images_per_s": statistics.median(a for a, _ in pairs),
        "ratio": ratio.value, "ratio_min": ratio.low, "ratio_max": ratio.high,
        "rounds": rounds, "flag": ratio.flag,
    }
    console.print(
        f"bench predict: {n} test images, {len(predictor.members)} members "
        f"({', '.join(f'{m.config.arch} {m.config.image_size}px' for m in predictor.members)}), "
        f"batch {batch_size}, {predictor.device.type}, {os.cpu_count()} cores"
    )
    console.print(
        f"  raysearch predict {result['predict_images_per_s']:.1f} images/s, pure forward "
        f"{result['pure_images_per_s']:.1f} images/s: ratio {ratio.text()} (target >= 0.8)"
    )
    return result
