"""CLI: argument parsing and error formatting only; every command calls a typed library function.

A ``RaysearchError`` prints as one line on stderr with exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from raysearch import __version__
from raysearch.errors import RaysearchError


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _stdout_console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough that tables do not truncate
        console = Console(width=160)
    return console


# ----------------------------------------------------------------------------- commands


def cmd_data(args) -> int:
    from raysearch.data.mura import read_mura, summary_table
    from raysearch.storage import atomic_write_parquet

    manifest = read_mura(
        args.root, val_fraction=args.val_fraction, seed=args.seed, skip_bad=args.skip_bad
    )
    out = _stdout_console()
    out.print(summary_table(manifest))
    skipped = manifest.attrs.get("skipped")
    if skipped is not None and len(skipped):
        _console().print(f"[yellow]left out {len(skipped)} bad image(s) (--skip-bad)[/]")
        for reason, n in skipped["reason"].value_counts().items():
            _console().print(f"  {n} x {reason}")
    unlisted = manifest.attrs.get("unlisted", 0)
    if unlisted:
        _console().print(f"[yellow]{unlisted} PNG file(s) on disk are not listed in the CSVs[/]")
    if args.out:
        atomic_write_parquet(manifest, args.out)
        out.print(f"manifest: {len(manifest)} images -> {args.out}")
    return 0


def cmd_demo_data(args) -> int:
    import time

    from raysearch.data.synth import make_demo_data

    t0 = time.perf_counter()
    root = make_demo_data(args.dir, seed=args.seed, size=args.size, label_noise=args.label_noise)
    _stdout_console().print(f"demo dataset ({args.size}, seed {args.seed}) -> {root} "
                            f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_train(args) -> int:
    from raysearch.train.trainer import run_single

    run_single(
        args.config, data_root=args.data_root, storage=args.storage, name=args.name,
        fresh=args.fresh, address=args.address, verbose=args.verbose,
    )
    return 0


def cmd_tune(args) -> int:
    from raysearch.search.budget import parse_duration
    from raysearch.search.space import load_search_space
    from raysearch.search.tune import extended_num_samples, run_search

    if args.extend is not None and args.num_samples is not None:
        from raysearch.errors import ConfigError

        raise ConfigError("--extend and --num-samples: give one of them")
    budget = parse_duration(args.time_budget) if args.time_budget is not None else None
    spec = load_search_space(
        args.space, data_root=args.data_root, name=args.name, storage=args.storage,
        num_samples=args.num_samples, max_concurrent=args.max_concurrent,
    )
    if args.extend is not None:
        spec = extended_num_samples(spec, args.extend)
    run_search(
        spec, resume=args.resume, overwrite=args.overwrite, address=args.address,
        verbose=args.verbose, trust=args.trust_experiment, time_budget_s=budget,
        console=_stdout_console(),
    )
    return 0


def cmd_status(args) -> int:
    from raysearch.experiment import experiment_status, find_experiment
    from raysearch.report.status import status_view

    exp_dir = find_experiment(args.experiment, storage=args.storage)
    _stdout_console().print(status_view(experiment_status(exp_dir)))
    return 0


def cmd_list(args) -> int:
    from raysearch.experiment import list_status
    from raysearch.report.status import experiments_table

    frame = list_status(args.storage)
    out = _stdout_console()
    if frame.empty:
        out.print(f"no experiments under {args.storage}")
    else:
        out.print(experiments_table(frame, title=f"experiments under {args.storage}"))
    return 0


def cmd_export(args) -> int:
    from raysearch.inference.export import export_ensemble

    out = export_ensemble(args.ensemble, format=args.format, out=args.out)
    _stdout_console().print(f"{args.format} export of {args.ensemble} -> {out} (manifest: "
                            f"{out}/export.json)")
    return 0


def cmd_ensemble(args) -> int:
    from raysearch.ensemble.run import run_ensemble

    run_ensemble(
        experiment=args.experiment, storage=args.storage, top=args.top, method=args.method,
        tta=args.tta, out=args.out, n_boot=args.n_boot, seed=args.seed,
        console=_stdout_console(),
    )
    return 0


def cmd_predict(args) -> int:
    from raysearch.inference.predict import run_predict

    run_predict(args.inputs, ensemble=args.ensemble, storage=args.storage, out=args.out,
                tta=args.tta, batch_size=args.batch_size, console=_console())
    return 0


def cmd_serve(args) -> int:
    from raysearch.serve.app import Limits
    from raysearch.serve.run import run_serve

    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_images=args.max_images,
                    max_pixels=args.max_pixels)
    run_serve(ensemble=args.ensemble, storage=args.storage, host=args.host, port=args.port,
              replicas=args.replicas, max_batch_size=args.max_batch_size, limits=limits,
              address=args.address, verbose=args.verbose, console=_console())
    return 0


def cmd_weights_fetch(args) -> int:
    from raysearch.models.weights import fetch_weights

    uri = fetch_weights(args.arch, to=args.to)
    _stdout_console().print(f"{args.arch}: ImageNet weights staged at {uri}")
    return 0


def cmd_bench(args) -> int:
    from raysearch.bench import pipeline as bench

    console = _stdout_console()
    if args.what == "data":
        bench.bench_data(root=args.root, image_size=args.image_size or 128,
                         n_images=args.n_images, console=console)
    elif args.what == "step":
        from raysearch.bench.step import bench_step

        r = bench_step(arch=args.arch, image_size=args.image_size or 64,
                       batch_size=args.batch_size, steps=args.steps)
        console.print(
            f"bench step: {r['arch']} {r['image_size']}px batch {r['batch_size']} on {r['device']} "
            f"({r['amp']}{', channels_last' if r['channels_last'] else ''}, "
            f"{os.cpu_count()} cores): model alone {r['pure_images_per_s']:.1f} images/s, "
            f"epoch step {r['step_images_per_s']:.1f} images/s, ratio {r['ratio']:.2f} "
            "(target >= 0.9)"
        )
    elif args.what == "train":
        bench.bench_train(root=args.root, arch=args.arch, image_size=args.image_size or 64,
                          batch_size=args.batch_size, console=console)
    else:
        sched = {k: v for k, v in (("max_epochs", args.max_epochs),
                                   ("grace_period", args.grace_period),
                                   ("reduction_factor", args.reduction_factor)) if v is not None}
        from raysearch.bench.search import BENCH_TRIALS, bench_search

        bench_search(root=args.root, space=args.space, num_samples=args.num_samples or BENCH_TRIALS,
                     seeds=tuple(args.seeds), storage=args.storage, console=console, **sched)
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raysearch",
        description="Distributed hyperparameter and ensemble search for radiograph classification.",
    )
    p.add_argument("--version", action="version", version=f"raysearch {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("data", help="validate a MURA-v1.1 dataset and summarise it")
    s.add_argument("root", help="the MURA-v1.1 folder or its parent (path or URL)")
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--skip-bad", action="store_true", help="leave out bad images and say how many")
    s.add_argument("--out", help="write the manifest to this Parquet file")
    s.set_defaults(func=cmd_data)

    s = sub.add_parser("demo-data", help="write a synthetic dataset in the MURA-v1.1 layout")
    s.add_argument("dir")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", default="small", choices=["tiny", "small", "medium", "large"])
    s.add_argument("--label-noise", type=float, default=0.03)
    s.set_defaults(func=cmd_demo_data)

    s = sub.add_parser("train", help="run one trial (no search) under Ray Train")
    s.add_argument("config", help="trial config YAML")
    s.add_argument("--data-root")
    s.add_argument("--storage")
    s.add_argument("--name")
    s.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    s.add_argument("-v", "--verbose", action="store_true", help="show Ray's own logs")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("tune", help="run the search described by a search-space YAML")
    s.add_argument("space", help="search-space YAML, e.g. search_spaces/demo.yaml")
    s.add_argument("--data-root")
    s.add_argument("--name")
    s.add_argument("--storage", help="local folder or gs://bucket/prefix")
    s.add_argument("--num-samples", type=int,
                   help="trials in all; on a finished experiment, a larger number extends it")
    s.add_argument("--extend", type=int, metavar="N",
                   help="N more trials than the existing experiment holds (same space)")
    s.add_argument("--time-budget", metavar="DURATION",
                   help="e.g. 90m, 6h, 1h30m: after it, start no new trial and let running ones "
                   "finish")
    s.add_argument("--max-concurrent", type=int)
    s.add_argument("--resume", action="store_true", help="continue an existing experiment")
    s.add_argument("--overwrite", action="store_true", help="replace an existing experiment")
    s.add_argument("--trust-experiment", action="store_true",
                   help="resume an experiment whose Ray state this machine did not sign (Ray "
                   "unpickles it: only for a folder you trust)")
    s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    s.add_argument("-v", "--verbose", action="store_true", help="show Ray's own logs")
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("ensemble", help="select members, score on test, write reports")
    s.add_argument("--experiment", help="name, folder or URL (default: the most recent)")
    s.add_argument("--storage", default="reports", help="where experiments live (default reports)")
    s.add_argument("--top", type=int, default=4, help="K members (top-k) / max rounds (greedy)")
    s.add_argument("--method", choices=["top", "greedy"], default="top")
    s.add_argument("--tta", action="store_true", help="horizontal-flip test-time augmentation")
    s.add_argument("--out", help="output folder (default <experiment>/ensemble)")
    s.add_argument("--n-boot", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_ensemble)

    s = sub.add_parser("status", help="an experiment's state, trials and time spent (no Ray)")
    s.add_argument("experiment", nargs="?",
                   help="name, folder or URL (default: the most recent under --storage)")
    s.add_argument("--storage", default="reports", help="where experiments live (default reports)")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("list", help="the experiments under a storage folder or URL")
    s.add_argument("storage", nargs="?", default="reports",
                   help="folder or URL (default reports)")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("export", help="write an ensemble's members as TorchScript or ONNX files")
    s.add_argument("--ensemble", required=True,
                   help="ensemble folder, or an experiment (its ensemble, else its best trial)")
    s.add_argument("--format", required=True, choices=["torchscript", "onnx"])
    s.add_argument("--out", help="output folder (default <ensemble>/export-<format>)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("predict", help="run a trained ensemble on new studies (PNG, JPEG, DICOM)")
    s.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders of studies (any depth), a CSV of image_path and "
                   "study_id, or URLs of any of these")
    s.add_argument("--ensemble", help="ensemble or experiment folder (default: the most recent "
                   "experiment under --storage)")
    s.add_argument("--storage", default="reports")
    s.add_argument("--out", default="predictions", help="output folder (default predictions)")
    s.add_argument("--tta", action="store_true", help="horizontal-flip test-time augmentation")
    s.add_argument("--batch-size", type=int, default=64)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("serve", help="serve a trained ensemble over HTTP (Ray Serve)")
    s.add_argument("--ensemble", help="ensemble or experiment folder (default: the most recent "
                   "experiment under --storage)")
    s.add_argument("--storage", default="reports")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--replicas", type=int, default=1)
    s.add_argument("--max-batch-size", type=int, default=8)
    s.add_argument("--max-body-mb", type=float, default=64, help="largest request body (MB)")
    s.add_argument("--max-images", type=int, default=16, help="most images in one study")
    s.add_argument("--max-pixels", type=int, default=50_000_000,
                   help="most pixels in one image (read from its header, before decoding)")
    s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    s.add_argument("-v", "--verbose", action="store_true", help="show Ray's own logs")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("weights", help="pretrained weights")
    ws = s.add_subparsers(dest="weights_command", required=True)
    f = ws.add_parser("fetch", help="stage torchvision's ImageNet weights into a folder or bucket")
    f.add_argument("arch")
    f.add_argument("--to", required=True, help="folder or URL (gs://bucket/weights/)")
    f.set_defaults(func=cmd_weights_fetch)

    s = sub.add_parser("bench", help="measure speed, side by side in one run")
    s.add_argument("what", choices=["data", "step", "train", "search"])
    s.add_argument("--root", help="dataset (default: generated demo data)")
    s.add_argument("--image-size", type=int)
    s.add_argument("--n-images", type=int, default=512)
    s.add_argument("--arch", default="resnet18")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--steps", type=int, default=30, help="step: timed batches per measurement")
    s.add_argument("--num-samples", type=int, help="search: trials per search (default 24)")
    s.add_argument("--max-epochs", type=int, help="search: epochs per trial (default 27)")
    s.add_argument("--grace-period", type=int, help="search: ASHA's first rung (default 3)")
    s.add_argument("--reduction-factor", type=float, help="search: ASHA's rate (default 3)")
    s.add_argument("--space", help="search: the search-space file (default: the demo's)")
    s.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="search: one pair of searches per seed (default: 0)")
    s.add_argument("--storage", help="search: keep the experiments here and continue them when "
                   "run again (default: a temp folder)")
    s.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from raysearch.logs import log_path, quiet_libraries

    quiet_libraries(verbose=getattr(args, "verbose", False), command=args.command)
    debug = args.debug or bool(os.environ.get("RAYSEARCH_DEBUG"))
    try:
        return args.func(args)
    except RaysearchError as e:
        if debug:
            raise
        print(f"raysearch: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("raysearch: interrupted; run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an unexpected library error: one line unless --debug
        if debug:
            raise
        from raysearch.errors import find_os_error, first_line, os_error_message

        os_error = find_os_error(e)
        message = os_error_message(os_error) if os_error is not None else None
        if message is not None:  # a full disk, a missing permission: the user can act on it
            print(f"raysearch: error: {message}", file=sys.stderr)
            return 2
        import logging

        logging.getLogger("raysearch").error("unexpected error", exc_info=e)
        log = f"; details in {log_path()}" if log_path() else ""
        print(f"raysearch: unexpected {type(e).__name__}: {first_line(e)} (run with --debug for "
              f"the traceback{log})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
