"""Benchmark, serving: the Serve app of an ensemble under a bounded load, with dynamic batching on
and with batch size 1, side by side.

Both variants run at once as two Serve applications of the same ensemble on one local HTTP
proxy (``/batched`` and ``/single``), bound to 127.0.0.1, and the load goes to localhost only:
``studies`` POSTs of test studies of the experiment (its manifest), spread over ``rounds``
alternating rounds (ABBA...), each round sent by ``clients`` concurrent clients. It prints
throughput (studies per second) and p50/p95/p99 latency per variant, and the median ratio of
the paired throughputs. Nothing may be lost: every request must get a 200, and every answer must
match :meth:`raysearch.inference.Predictor.predict` on the same files (which ``raysearch
predict`` runs), else it raises :class:`~raysearch.errors.RaysearchError`.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from raysearch.errors import ConfigError, RaysearchError

__all__ = ["bench_serve"]

VARIANTS = {"batched": 8, "single": 1}  # route -> max_batch_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentiles(latencies: list[float]) -> dict[str, float]:
    p50, p95, p99 = np.percentile(np.asarray(latencies) * 1000.0, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def bench_serve(
    *,
    ensemble: str | None = None,
    storage: str = "reports",
    studies: int = 300,
    clients: int = 16,
    rounds: int = 4,
    console=None,
) -> dict[str, Any]:
    """Throughput and latency of the Serve app with batching (``max_batch_size`` 8) and without
    (1). Returns ``{"batched": {...}, "single": {...}, "ratio": ..., "lost": 0, ...}``. Raises
    :class:`ConfigError` for bad counts and :class:`RaysearchError` when a request is lost or an
    answer differs from the predictor's."""
    import requests
    from rich.console import Console

    from raysearch.bench.paired import paired_ratio
    from raysearch.bench.predict import _test_split
    from raysearch.cluster import init_ray
    from raysearch.experiment import find_experiment
    from raysearch.inference.predictor import Predictor
    from raysearch.serve.app import build_app

    console = console or Console()
    if studies < 2 or clients < 1 or rounds < 1:
        raise ConfigError("--studies must be >= 2, --clients and --rounds >= 1")
    source = ensemble or find_experiment(None, storage=storage)
    test = _test_split(source)
    by_study = [g["image_path"].tolist() for _, g in test.groupby("study_id", sort=True)]
    files = {p: open(p, "rb").read() for paths in by_study for p in paths}  # noqa: SIM115
    expected = Predictor.from_dir(source, device="cpu").predict(list(files))
    want = {p: expected.probs[i] for i, p in enumerate(files)}

    init_ray()
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for route, size in VARIANTS.items():
            serve.run(build_app(source, max_batch_size=size), name=f"bench-{route}",
                      route_prefix=f"/{route}", blocking=False)
        base = f"http://127.0.0.1:{port}"
        for route in VARIANTS:  # ready, and warm
            deadline = time.time() + 120
            while requests.get(f"{base}/{route}/healthz", timeout=10).status_code != 200:
                if time.time() > deadline:
                    raise RaysearchError(f"the {route} app never became healthy")
                time.sleep(0.5)

        def post(route: str, paths: list[str]) -> tuple[float, int, dict | str]:
            start = time.perf_counter()
            r = requests.post(f"{base}/{route}/v1/predict", timeout=300, files=[
                ("image", (os.path.basename(p), files[p], "image/png")) for p in paths])
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") \
                else r.text
            return time.perf_counter() - start, r.status_code, body

        def run(route: str, batch: list[list[str]]) -> tuple[float, list[float]]:
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                answers = list(pool.map(lambda paths: post(route, paths), batch))
            wall = time.perf_counter() - start
            for paths, (_, status, body) in zip(batch, answers):
                if status != 200:
                    raise RaysearchError(f"{route}: a request got {status}: {body}")
                got = np.array([[img["probs"][lb] for lb in body["labels"]]
                                for img in body["images"]])
                if not np.allclose(got, np.stack([want[p] for p in paths]), atol=1e-4):
                    raise RaysearchError(f"{route}: the answer for {paths[0]} differs from the "
                                         "predictor's")
            return len(batch) / wall, [lat for lat, _, _ in answers]

        for route in VARIANTS:
            run(route, by_study[:clients])  # warm-up: every replica's first batches
        per_round = max(1, studies // rounds)
        sent = [by_study[i % len(by_study)] for i in range(per_round * rounds)]
        results = {route: {"throughputs": [], "latencies": []} for route in VARIANTS}
        for r in range(rounds):
            chunk = sent[r * per_round:(r + 1) * per_round]
            order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
            for route in order:
                tput, lat = run(route, chunk)
                results[route]["throughputs"].append(tput)
                results[route]["latencies"] += lat
    finally:
        serve.shutdown()

    out: dict[str, Any] = {"ensemble": source, "studies": len(sent), "clients": clients,
                           "rounds": rounds, "cores": os.cpu_count(), "lost": 0}
    for route, res in results.items():
        out[route] = {"studies_per_s": statistics.median(res["throughputs"]),
                      "max_batch_size": VARIANTS[route], **_percentiles(res["latencies"])}
    ratio = paired_ratio(list(zip(results["single"]["throughputs"],
                                  results["batched"]["throughputs"])))
    out.update(ratio=ratio.median, ratio_min=ratio.low, ratio_max=ratio.high)
    console.print(f"bench serve: {len(sent)} studies per variant ({len(test)} test images in "
                  f"{len(by_study)} studies, reused), {clients} concurrent clients, localhost, "
                  f"{os.cpu_count()} cores")
    for route in VARIANTS:
        o = out[route]
        console.print(f"  {route:8} (max batch {o['max_batch_size']}): "
                      f"{o['studies_per_s']:.1f} studies/s, latency p50 {o['p50_ms']:.0f} ms, "
                      f"p95 {o['p95_ms']:.0f} ms, p99 {o['p99_ms']:.0f} ms")
    console.print(f"  batching / batch size 1: throughput x{ratio.text()}; every request "
                  "answered, every answer equal to the predictor's")
    return out
