"""CLI: argument parsing and error formatting only; every command calls a typed library function.

A ``RaysearchError`` prints as one line on stderr with exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from raysearch import __version__
from raysearch.errors import ConfigError, RaysearchError


def _console():
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, width=160, soft_wrap=True)


def _stdout_console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        # Logs and CI: wide enough that tables do not truncate, and a long line (a path) stays
        # one line, so that grep and the next program see it whole.
        console = Console(width=160, soft_wrap=True)
    return console


# ----------------------------------------------------------------------------- commands


def _check_out(path: str | None, *, option: str = "--out", file: bool = False) -> None:
    """Refuse an output path that cannot be written, before the command's work rather than after
    it (an ensemble scored for minutes, then "a file is in the way"): a folder output (``file``
    False) that is, or lies under, a file; a file output whose folder is under a file, or that is
    a folder itself. URLs pass (a bucket prefix needs no folder). Raises :class:`ConfigError`."""
    from raysearch.storage import check_storage_folder, is_url

    if path is None or is_url(path):
        return
    if not file:
        check_storage_folder(path, what=option)
        return
    local = os.path.abspath(os.path.expanduser(str(path).removeprefix("file://")))
    if os.path.isdir(local):
        raise ConfigError(f"{option}: {path} is a folder, not a file")
    check_storage_folder(os.path.dirname(local), what=f"{option} {path}")


def _data_options(args) -> dict:
    """The `raysearch data` flags that set DataConfig options (None: not given)."""
    out = {"format": args.format, "views": args.views, "uncertain": args.uncertain,
           "blank": args.blank, "test_fraction": args.test_fraction,
           "val_fraction": args.val_fraction, "seed": args.seed}
    if args.labels is not None:
        words = [x.strip() for x in args.labels.split(",") if x.strip()]
        out["labels"] = words[0] if words in (["all"], ["competition"]) else words
    if args.drop_all_negative:
        out["drop_all_negative"] = True
    if args.any_finding:
        out["any_finding"] = True
    return {k: v for k, v in out.items() if v is not None}


def cmd_data(args) -> int:
    import dataclasses

    from raysearch.config import DataConfig, build

    _check_out(args.out, file=True)  # before the dataset is read
    data, source = DataConfig(root=args.root or ""), ""
    if args.space:  # the split the search will use: its root, val_fraction, seed, skip_bad
        from raysearch.search.space import load_search_space

        data, source = load_search_space(args.space, data_root=args.root).data, f" ({args.space})"
    elif not args.root:
        raise ConfigError("data: give the dataset folder, or --space SPACE to read it from a space")
    # Through the dataclass, so the options are checked as the space's keys are.
    fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(DataConfig)}
    data = build(DataConfig, {**fields, **_data_options(args)}, path="data")
    from raysearch.data.formats import resolve_format

    if resolve_format(data) != "mura":
        return _data_multilabel(args, data, source)
    val_fraction, seed = data.val_fraction, data.seed
    from raysearch.data.mura import read_mura, skipped_counts, skipped_frame, summary_table
    from raysearch.data.prepare import _check_mura_options
    from raysearch.storage import atomic_write_parquet

    _check_mura_options(data)
    manifest = read_mura(data.root, val_fraction=val_fraction, seed=seed,
                         skip_bad=args.skip_bad or data.skip_bad)  # fmt: skip
    out = _stdout_console()
    out.print(summary_table(manifest))
    out.print(f"split: val_fraction {val_fraction:g} of the official train patients, "
              f"seed {seed}{source}")  # fmt: skip
    if counts := skipped_counts(manifest):
        _console().print(f"[yellow]left out {counts} (--skip-bad)[/]")
        for reason, n in skipped_frame(manifest)["reason"].value_counts().items():
            _console().print(f"  {n} x {reason}")
    unlisted = manifest.attrs.get("unlisted", 0)
    if unlisted:
        _console().print(f"[yellow]{unlisted} PNG file(s) on disk are not listed in the CSVs[/]")
    if args.out:
        atomic_write_parquet(manifest, args.out)
        out.print(f"manifest: {len(manifest)} images -> {args.out}")
    return 0


def _data_multilabel(args, data, source: str) -> int:
    """`raysearch data` for chexpert, nih and csv: the manifest summary, the per-label policy
    table (raw counts before the policy, targets after it, images kept) and the split."""
    import dataclasses

    from raysearch.data.formats import read_any, resolve_format
    from raysearch.data.mura import skipped_counts, skipped_frame
    from raysearch.data.reader import summary_table
    from raysearch.storage import atomic_write_parquet

    data = dataclasses.replace(data, skip_bad=args.skip_bad or data.skip_bad)
    manifest, task = read_any(data)
    out = _stdout_console()
    out.print(summary_table(manifest, task, title=f"{resolve_format(data)} manifest"))
    out.print(manifest.attrs["policy"])
    out.print(f"split: {manifest.attrs['split_note']}{source}; task: {task.k} label(s), "
              f"study = {task.aggregation} of its images, metrics per {task.group}")
    if counts := skipped_counts(manifest):
        _console().print(f"[yellow]left out {counts} (--skip-bad)[/]")
        for reason, n in skipped_frame(manifest)["reason"].value_counts().items():
            _console().print(f"  {n} x {reason}")
    if args.out:
        clean = manifest.copy()
        clean.attrs = {}
        atomic_write_parquet(clean, args.out)
        out.print(f"manifest: {len(manifest)} images -> {args.out}")
    return 0


def cmd_demo_data(args) -> int:
    import time

    from raysearch.data.synth import make_demo_data

    t0 = time.perf_counter()
    if args.format == "mura":
        root = make_demo_data(args.dir, seed=args.seed, size=args.size,
                              label_noise=args.label_noise, overwrite=args.overwrite,
                              shortcut=args.shortcut)
    else:
        from raysearch.data.synth_chest import make_chexpert_demo, make_nih_demo

        if args.shortcut is not None:
            from raysearch.errors import ConfigError

            raise ConfigError("--shortcut ties MURA's L/R marker to the label: it applies to "
                              f"--format mura only, not {args.format}")

        make = make_chexpert_demo if args.format == "chexpert" else make_nih_demo
        root = make(args.dir, seed=args.seed, size=args.size, overwrite=args.overwrite)
    _stdout_console().print(f"demo dataset ({args.size}, seed {args.seed}) -> {root} "
                            f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_train(args) -> int:
    from raysearch.train.preflight import load_train_config

    # The config, data root and resources first: a mistake answers before torch and Ray load.
    load_train_config(args.config, data_root=args.data_root, name=args.name,
                      storage=args.storage, address=args.address)
    from raysearch.train.trainer import run_single

    run_single(
        args.config, data_root=args.data_root, storage=args.storage, name=args.name,
        fresh=args.fresh, address=args.address, verbose=args.verbose, console=_stdout_console(),
    )
    return 0


def cmd_tune(args) -> int:
    from raysearch.search.budget import parse_duration
    from raysearch.search.preflight import preflight_search
    from raysearch.search.space import load_search_space

    if args.extend is not None and args.num_samples is not None:
        from raysearch.errors import ConfigError

        raise ConfigError("--extend and --num-samples: give one of them")
    budget = parse_duration(args.time_budget) if args.time_budget is not None else None
    spec = load_search_space(
        args.space, data_root=args.data_root, name=args.name, storage=args.storage,
        num_samples=args.num_samples, max_concurrent=args.max_concurrent,
    )
    if args.extend is not None:
        from raysearch.search.tune import extended_num_samples

        spec = extended_num_samples(spec, args.extend)
    # The data root and resources first: a mistake answers before torch and Ray load.
    preflight_search(spec, resume=args.resume, overwrite=args.overwrite, address=args.address)
    from raysearch.search.tune import run_search

    out = _stdout_console()
    exp_dir = run_search(
        spec, resume=args.resume, overwrite=args.overwrite, address=args.address,
        verbose=args.verbose, trust=args.trust_experiment, time_budget_s=budget, console=out,
    )
    if args.report:
        _make_report(exp_dir)
    else:
        out.print(f"an HTML report of this search: raysearch report --experiment {exp_dir}",
                  soft_wrap=True)
    return 0


def cmd_status(args) -> int:
    from raysearch.experiment import experiment_status, find_experiment
    from raysearch.report.status import status_view

    exp_dir = find_experiment(args.experiment, storage=args.storage)
    _stdout_console().print(status_view(experiment_status(exp_dir)))
    return 0


def cmd_list(args) -> int:
    from raysearch.experiment import list_status

    frame = list_status(args.storage)  # a wrong folder answers before the tables load pandas
    from raysearch.report.status import experiments_table

    out = _stdout_console()
    if frame.empty:
        from raysearch.experiment import is_experiment

        parent = str(args.storage).rstrip("/").rsplit("/", 1)[0] if "/" in str(
            args.storage).rstrip("/") else "."
        hint = (f" ({args.storage} is itself an experiment: `raysearch status {args.storage}`, "
                f"or `raysearch list {parent}`)" if is_experiment(args.storage) else "")
        out.print(f"no experiments under {args.storage}{hint}", soft_wrap=True)
    else:
        out.print(experiments_table(frame, title=f"experiments under {args.storage}"))
    return 0


def cmd_export(args) -> int:
    from raysearch.experiment import check_model_folder

    check_model_folder(args.ensemble)  # before torch loads
    _check_out(args.out)
    from raysearch.inference.export import export_ensemble

    out = export_ensemble(args.ensemble, format=args.format, out=args.out)
    _stdout_console().print(f"{args.format} export of {args.ensemble} -> {out} (manifest: "
                            f"{out}/export.json)")
    return 0


def cmd_ensemble(args) -> int:
    from raysearch.experiment import find_experiment

    experiment = find_experiment(args.experiment, storage=args.storage)  # before pandas loads
    _check_out(args.out)
    if args.test_data is not None:  # its files, before the members are scored
        from raysearch.config import DataConfig
        from raysearch.data.formats import check_data_root

        check_data_root(DataConfig(root=args.test_data, format=args.format or "auto"))
    from raysearch.ensemble.run import run_ensemble

    run_ensemble(
        experiment=experiment, storage=args.storage, top=args.top, method=args.method,
        tta=args.tta, out=args.out, n_boot=args.n_boot, seed=args.seed,
        target_sensitivity=args.target_sensitivity, worklist_rule=args.worklist_rule,
        test_data=args.test_data, test_format=args.format, oof=args.oof,
        console=_stdout_console(),
    )
    if args.report:
        _make_report(experiment)
    else:
        _stdout_console().print(f"an HTML report of the search and its ensemble: raysearch "
                                f"report --experiment {experiment}", soft_wrap=True)
    return 0


def cmd_report(args) -> int:
    from raysearch.experiment import find_experiment

    experiment = find_experiment(args.experiment, storage=args.storage)
    _check_out(args.out, file=True)
    _make_report(experiment, out=args.out)
    return 0


def _make_report(experiment: str, out: str | None = None) -> None:
    from raysearch.report.html import build_report

    path, stats = build_report(experiment, out=out)
    _stdout_console().print(
        f"report of {experiment} -> {path} ({stats['bytes'] / 1e6:.2f} MB, {stats['figures']} "
        f"figures, also as SVG in {stats['figure_dir']}, {stats['seconds']:.1f} s)",
        soft_wrap=True)


def cmd_refit(args) -> int:
    from raysearch.errors import ConfigError
    from raysearch.experiment import find_experiment

    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    if args.folds is not None and args.folds < 2:
        raise ConfigError(f"--folds must be an integer >= 2, got {args.folds}")
    _check_seeds("--seed", [] if args.seed is None else [args.seed])

    experiment = find_experiment(args.experiment, storage=args.storage)  # before Ray loads
    from raysearch.search.refit import run_refit

    run_refit(experiment=experiment, storage=args.storage, top=args.top, folds=args.folds,
              seed=args.seed, address=args.address, verbose=args.verbose,
              console=_stdout_console())
    return 0


def cmd_predict(args) -> int:
    from raysearch.experiment import check_model_folder

    if args.ensemble:
        check_model_folder(args.ensemble)  # before pandas and torch load
    _check_out(args.out)
    from raysearch.inference.predict import run_predict

    run_predict(args.inputs, ensemble=args.ensemble, storage=args.storage, out=args.out,
                tta=args.tta, batch_size=args.batch_size, console=_console())
    return 0


def cmd_explain(args) -> int:
    import importlib.util

    from raysearch.errors import ConfigError
    from raysearch.experiment import check_model_folder

    if importlib.util.find_spec("pytorch_grad_cam") is None:  # an extra: sdist only, no wheel
        raise ConfigError("raysearch explain needs the grad-cam package: "
                          "pip install 'raysearch[explain]' (or pip install grad-cam)")
    if args.data_root is not None:  # before the ensemble's maps are made, not after
        if not args.audit:
            raise ConfigError("--data-root applies to explain --audit only (images to explain "
                              "are given as INPUT or --studies)")
        from raysearch.errors import DataError
        from raysearch.storage import exists

        if not exists(args.data_root):
            raise DataError(f"dataset folder does not exist: {args.data_root}")
    if args.ensemble:
        check_model_folder(args.ensemble)  # before pandas and torch load
    _check_out(args.out)
    console = _stdout_console()
    if args.audit:
        from raysearch.explain.audit import audit_table, run_audit

        if args.inputs or args.studies or args.worst is not None:
            raise ConfigError("explain --audit reads the data's annotations.parquet: give "
                              "--data-root (or the experiment's manifest), not images")
        frame = run_audit(ensemble=args.ensemble, storage=args.storage, data_root=args.data_root,
                          method=args.method, label=args.label, layer=args.layer, out=args.out,
                          max_images=args.max_images, threshold=args.marker_threshold)
        console.print(audit_table(frame, threshold=args.marker_threshold))
        console.print(f"audit -> {args.out}/audit.parquet", highlight=False)
        return 0
    from raysearch.explain.run import run_explain

    table = run_explain(args.inputs, ensemble=args.ensemble, storage=args.storage,
                        studies=args.studies or (), worst=args.worst, method=args.method,
                        label=args.label, layer=args.layer, out=args.out)
    n = table["image_path"].nunique()
    console.print(f"explained {n} image(s) of {table['study_id'].nunique()} study(ies) with "
                  f"{args.method} -> {args.out} (explanations.parquet, overlays/, studies/, maps/)",
                  highlight=False)
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
    from raysearch.models.registry import check_arch

    check_arch(args.arch)  # before torch loads
    _check_out(args.to, option="--to")
    from raysearch.models.weights import fetch_weights

    uri = fetch_weights(args.arch, to=args.to)
    _stdout_console().print(f"{args.arch}: ImageNet weights staged at {uri}")
    return 0


def cmd_weights_stage_demo(args) -> int:
    from raysearch.errors import ConfigError
    from raysearch.models.registry import check_arch

    check_arch(args.arch)  # before torch loads
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
    if args.image_size < 16:
        raise ConfigError(f"--image-size must be >= 16, got {args.image_size}")
    _check_out(args.to, option="--to")
    from raysearch.train.pretrain import stage_demo_weights

    stage_demo_weights(args.to, arch=args.arch, image_size=args.image_size, epochs=args.epochs,
                       size=args.size, console=_stdout_console())
    return 0


def cmd_init(args) -> int:
    from raysearch.search.space import write_starter_space

    path = write_starter_space(args.path, template=args.template, overwrite=args.force)
    _stdout_console().print(f"wrote the {args.template} search space to {path}; edit it, then: "
                            f"raysearch tune {path}", highlight=False)
    return 0


# bench option (argparse dest) -> the benches that read it; the help says the same.
_BENCH_OPTIONS = {
    "root": ("data", "train", "search"),
    "image_size": ("data", "step", "train", "train --finetune", "explain"),
    "method": ("explain",),
    "n_images": ("data",),
    "arch": ("step", "train", "train --finetune", "explain"),
    "batch_size": ("step", "train", "train --finetune", "predict"),
    "steps": ("step", "explain"),
    "rounds": ("data", "step", "train", "train --finetune", "predict", "serve", "explain"),
    **{k: ("search",) for k in ("num_samples", "max_epochs", "grace_period", "reduction_factor",
                                "space", "seeds")},
    "storage": ("search", "predict", "serve"),
    "ensemble": ("predict", "serve"),
    "studies": ("serve",),
    "clients": ("serve",),
}

def _check_bench_args(args) -> None:
    """Options that do not apply to ``args.what``, values out of range, and the paths a bench
    reads (``--root``, ``--space``, ``--ensemble``): one line each, before torch or Ray is
    imported, so that a wrong path is answered at once as ``tune``'s and ``predict``'s are."""
    from raysearch.errors import ConfigError

    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {args.rounds}")
    if args.finetune and args.what != "train":
        raise ConfigError(f"--finetune applies to `bench train` only, not `bench {args.what}`")
    # Any other option given to a bench that does not read it (it was ignored without a word).
    # `bench train --finetune` reads no dataset: it times steps on tensors.
    what = "train --finetune" if args.what == "train" and args.finetune else args.what
    for dest, applies in _BENCH_OPTIONS.items():
        value = getattr(args, dest)
        if what not in applies and value is not None and value != args.bench_defaults.get(dest):
            option = "--" + dest.replace("_", "-")
            raise ConfigError(f"{option} applies to bench {', '.join(applies)} only, not "
                              f"`bench {what}`")
    if args.last_n_blocks is not None:
        if args.what != "train" or args.finetune not in ("full", "gradual"):
            raise ConfigError("--last-n-blocks applies to `bench train --finetune full|gradual` "
                              "only")
        from raysearch.models.registry import num_blocks

        n = num_blocks(args.arch)
        if not 1 <= args.last_n_blocks <= n:
            raise ConfigError(f"--last-n-blocks must be in [1, {n}] ({args.arch} has {n} "
                              f"blocks), got {args.last_n_blocks}")
    if args.what == "data" and args.root is not None:  # bench data reads MURA
        from raysearch.data.roots import check_mura_root

        check_mura_root(args.root)
    elif args.what == "search":  # the space with its data root, as bench search will read them
        from raysearch.data.formats import check_data_root
        from raysearch.search.space import load_search_space

        spec = load_search_space(args.space or "demo", data_root=args.root)
        if args.root is not None:
            check_data_root(spec.data)
    elif args.what == "train" and args.root is not None and not args.finetune:
        from raysearch.config import DataConfig
        from raysearch.data.formats import check_data_root

        check_data_root(DataConfig(root=args.root))
    elif args.what in ("predict", "serve"):
        from raysearch.experiment import find_experiment
        from raysearch.experiment.folder import check_model_folder

        check_model_folder(args.ensemble or find_experiment(None, storage=args.storage or "reports"))


def cmd_bench(args) -> int:
    _check_bench_args(args)
    from raysearch.bench import pipeline as bench

    console = _stdout_console()
    if args.what == "data":
        bench.bench_data(root=args.root, image_size=args.image_size or 128,
                         n_images=args.n_images, rounds=args.rounds or 5, console=console)
    elif args.what == "step":
        from raysearch.bench.step import bench_step

        r = bench_step(arch=args.arch, image_size=args.image_size or 64,
                       batch_size=args.batch_size, steps=args.steps, rounds=args.rounds or 5)
        console.print(
            f"bench step: {r['arch']} {r['image_size']}px batch {r['batch_size']} on {r['device']} "
            f"({r['amp']}{', channels_last' if r['channels_last'] else ''}, "
            f"{os.cpu_count()} cores): model alone {r['pure_images_per_s']:.1f} images/s, "
            f"epoch step {r['step_images_per_s']:.1f} images/s (medians), ratio step / pure "
            f"{r['ratio_text']} (target >= 0.9)"
        )
    elif args.what == "explain":
        from raysearch.bench.explain import bench_explain

        r = bench_explain(arch=args.arch, image_size=args.image_size or 224, method=args.method,
                          steps=args.steps, rounds=args.rounds or 5)
        console.print(
            f"bench explain: {r['arch']} {r['image_size']}px on {r['device']} "
            f"({os.cpu_count()} cores), one image at a time: {r['method']} "
            f"{1000 / r['explain_images_per_s']:.1f} ms/image, forward + backward "
            f"{1000 / r['fb_images_per_s']:.1f} ms/image (medians); time ratio {r['method']} / "
            f"forward-backward {r['ratio_text']} (target <= 1.5). An ensemble costs its member "
            "count times this."
        )
    elif args.what == "predict":
        from raysearch.bench.predict import bench_predict

        bench_predict(ensemble=args.ensemble, storage=args.storage or "reports",
                      rounds=args.rounds or 4, batch_size=args.batch_size, console=console)
    elif args.what == "serve":
        from raysearch.bench.serve import bench_serve

        bench_serve(ensemble=args.ensemble, storage=args.storage or "reports",
                    studies=args.studies, clients=args.clients, rounds=args.rounds or 4,
                    console=console)
    elif args.what == "train" and args.finetune:
        from raysearch.bench.step import bench_finetune

        r = bench_finetune(arch=args.arch, image_size=args.image_size or 64,
                           batch_size=args.batch_size, mode=args.finetune,
                           last_n_blocks=args.last_n_blocks, rounds=args.rounds or 3)
        what = r["mode"] + (f", last {r['last_n_blocks']} blocks" if r["last_n_blocks"] else "")
        console.print(
            f"bench train --finetune: {r['arch']} {r['image_size']}px batch {r['batch_size']} on "
            f"{r['device']} ({os.cpu_count()} cores): full {r['full_images_per_s']:.1f} images/s "
            f"({r['full_trainable']:,} trainable), {what} {r['mode_images_per_s']:.1f} images/s "
            f"({r['mode_trainable']:,} trainable) (medians); {what} / full "
            f"{r['speedup']:.2f}x (median of {r['rounds']} paired rounds, range "
            f"{r['speedup_low']:.2f}-{r['speedup_high']:.2f})"
        )
    elif args.what == "train":
        bench.bench_train(root=args.root, arch=args.arch, image_size=args.image_size or 64,
                          batch_size=args.batch_size, rounds=args.rounds or 3, console=console)
    else:
        sched = {k: v for k, v in (("max_epochs", args.max_epochs),
                                   ("grace_period", args.grace_period),
                                   ("reduction_factor", args.reduction_factor)) if v is not None}
        _check_seeds("--seeds", args.seeds)  # before the demo data is generated
        from raysearch.bench.search import BENCH_TRIALS, bench_search

        bench_search(root=args.root, space=args.space, num_samples=args.num_samples or BENCH_TRIALS,
                     seeds=tuple(args.seeds), storage=args.storage, console=console, **sched)
    return 0


# ----------------------------------------------------------------------------- parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default (unless it has none, or says it already), and
    the description and examples keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings and not any(default is x for x in (None, False, argparse.SUPPRESS))
            and "%(default)" not in text and "default" not in text
        ):
            shown = " ".join(map(str, default)) if isinstance(default, list) else "%(default)s"
            text += f" (default: {shown})"
        return text


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _command(sub, name: str, *, help: str, examples: tuple[str, ...], common) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                          epilog=_examples(*examples), formatter_class=_HelpFormatter,
                          parents=[common])


def build_parser() -> argparse.ArgumentParser:
    from raysearch.config import CONFIGS_DIR, SEARCH_SPACES_DIR, packaged
    from raysearch.models.registry import ARCHITECTURES

    # --debug is taken before or after the command (`raysearch tune x.yaml --debug`); SUPPRESS
    # keeps a command's parser from resetting the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (also: RAYSEARCH_DEBUG=1)")
    p = argparse.ArgumentParser(
        prog="raysearch", formatter_class=_HelpFormatter,
        description="Distributed hyperparameter and ensemble search for radiograph classification.",
        epilog=_examples("raysearch demo-data demo_data", "raysearch tune demo",
                         "raysearch ensemble --top 4", "raysearch COMMAND --help"),
    )
    p.add_argument("--version", action="version", version=f"raysearch {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (also: RAYSEARCH_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    spaces = ", ".join(packaged(SEARCH_SPACES_DIR))
    configs = ", ".join(packaged(CONFIGS_DIR))
    address = "Ray cluster address (default: RAY_ADDRESS, else a local Ray instance)"
    verbose = "show Ray's own logs"

    s = _command(sub, "data", help="validate a dataset (MURA, CheXpert, ChestX-ray14 or a CSV "
                 "manifest) and summarise it", common=common,
                 examples=("raysearch data demo_data", "raysearch data --space demo",
                           "raysearch data /data/MURA-v1.1 --skip-bad --out manifest.parquet",
                           ("raysearch data /data/CheXpert-v1.0-small --uncertain drop "
                           "--drop-all-negative --test-fraction 0.2"),
                           "raysearch data my_manifest.csv --labels Cardiomegaly,Edema"))
    s.add_argument("root", nargs="?", help="the dataset folder (MURA-v1.1, CheXpert-v1.0(-small), "
                   "ChestX-ray14) or its parent, or a CSV/Parquet manifest (path or URL); "
                   "with --space, overrides the space's data.root")
    s.add_argument("--space", help="read the `data:` section of this search space, so the split "
                   "shown is the one `tune` uses (flags override it)")
    s.add_argument("--format", choices=["auto", "mura", "chexpert", "nih", "csv"], default=None,
                   help="the reader (default: the space's, else detected from the root)")
    s.add_argument("--val-fraction", type=float, default=None,
                   help="patients held out for val (default: the space's, else 0.1)")
    s.add_argument("--test-fraction", type=float, default=None,
                   help="split all patients train/val/test with this test share instead of the "
                   "official test set (not MURA)")
    s.add_argument("--seed", type=int, default=None, help="split seed (default: the space's, else 0)")
    s.add_argument("--views", choices=["all", "frontal", "lateral"], default=None,
                   help="CheXpert views to keep (default: all)")
    s.add_argument("--labels", default=None, help="all, competition, or comma-separated label "
                   "names (default: all)")
    s.add_argument("--uncertain", choices=["ignore", "zeros", "ones", "drop"], default=None,
                   help="uncertain (-1) labels: masked, 0, 1, or drop the image (default: ignore)")
    s.add_argument("--blank", choices=["zeros", "ignore"], default=None,
                   help="blank (not mentioned) labels: 0 or masked (default: zeros)")
    s.add_argument("--drop-all-negative", action="store_true",
                   help="drop images whose chosen labels are all 0 after the policies")
    s.add_argument("--any-finding", action="store_true",
                   help='add the label "Sick": any finding but Support Devices')
    s.add_argument("--skip-bad", action="store_true", help="leave out bad images and say how many")
    s.add_argument("--out", help="write the manifest to this Parquet file")
    s.set_defaults(func=cmd_data)

    s = _command(sub, "demo-data", help="write a synthetic dataset in the MURA-v1.1, "
                 "CheXpert-v1.0-small or ChestX-ray14 layout", common=common,
                 examples=("raysearch demo-data demo_data",
                           "raysearch demo-data /tmp/demo --size tiny --seed 1",
                           "raysearch demo-data chest_demo --format chexpert",
                           "raysearch demo-data chest_demo --format nih"))
    s.add_argument("dir", help="folder to write (MURA-v1.1, CheXpert-v1.0-small or "
                   "ChestX-ray14 is created inside it)")
    s.add_argument("--format", default="mura", choices=["mura", "chexpert", "nih"],
                   help="the layout and labels: MURA (one label), CheXpert (14 observations, "
                   "uncertain and blank values, frontal and lateral views) or ChestX-ray14 "
                   "(NIH names)")
    s.add_argument("--seed", type=int, default=0, help="seed of the generated images and labels")
    s.add_argument("--size", default="small", choices=["tiny", "small", "medium", "large"],
                   help="how many patients and images")
    s.add_argument("--label-noise", type=float, default=0.03,
                   help="fraction of studies whose label is flipped (mura)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace demo data made here before (never a folder demo-data did not make)")
    s.add_argument("--shortcut", type=float, metavar="P",
                   help="tie the L/R marker to the label with probability P (a confounded "
                   "variant for `explain --audit`; default: markers independent of the label)")
    s.set_defaults(func=cmd_demo_data)

    s = _command(sub, "init", help="write a starter search-space file to edit", common=common,
                 examples=("raysearch init", "raysearch init my_space.yaml --template mura"))
    s.add_argument("path", nargs="?", default="search_space.yaml", help="file to write")
    s.add_argument("--template", default="demo", choices=packaged(SEARCH_SPACES_DIR),
                   help="the shipped space to start from (demo: CPU, demo data; mura: GPU, MURA; "
                   "chexpert: GPU, CheXpert; chexpert_demo: CPU, chest demo data)")
    s.add_argument("--force", action="store_true", help="replace the file if it exists")
    s.set_defaults(func=cmd_init)

    s = _command(sub, "train", help="run one trial (no search) under Ray Train", common=common,
                 examples=("raysearch train demo_trial --data-root demo_data",
                           ("raysearch train configs/mura_baseline.yaml --data-root /data "
                            "--storage gs://bucket/runs")))
    s.add_argument("config", help=f"trial config YAML, or a shipped one by name ({configs})")
    s.add_argument("--data-root", help="dataset folder or URL (default: the file's data.root)")
    s.add_argument("--storage", help="local folder or gs://bucket/prefix (default: the file's "
                   "storage, else reports)")
    s.add_argument("--name", help="experiment name (default: the file's name, else train)")
    s.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    s.add_argument("--address", help=address)
    s.add_argument("-v", "--verbose", action="store_true", help=verbose)
    s.set_defaults(func=cmd_train)

    s = _command(sub, "tune", help="run the search described by a search-space YAML",
                 common=common, examples=(
                     "raysearch tune demo                  # the shipped CPU demo space",
                     ("raysearch tune search_spaces/mura.yaml --data-root gs://b/data "
                      "--storage gs://b/runs"),
                     "raysearch tune my_space.yaml --num-samples 16 --resume",
                     "raysearch tune demo --extend 8 --time-budget 2h   # 8 more trials"))
    s.add_argument("space", help=f"search-space YAML, or a shipped one by name ({spaces})")
    s.add_argument("--data-root", help="dataset folder or URL (default: the file's data.root)")
    s.add_argument("--name", help="experiment name (default: the file's name)")
    s.add_argument("--storage", help="local folder or gs://bucket/prefix (default: the file's "
                   "storage, else reports)")
    s.add_argument("--num-samples", type=int, help="trials in all; on a finished experiment, a "
                   "larger number extends it (default: the file's search.num_samples)")
    s.add_argument("--extend", type=int, metavar="N",
                   help="N more trials than the existing experiment holds (same space)")
    s.add_argument("--time-budget", metavar="DURATION",
                   help="e.g. 90m, 6h, 1h30m: after it, start no new trial and let running ones "
                   "finish (default: none)")
    s.add_argument("--max-concurrent", type=int, help="trials at a time (default: the file's, "
                   "else what the cluster fits)")
    s.add_argument("--resume", action="store_true", help="continue an existing experiment")
    s.add_argument("--overwrite", action="store_true", help="replace an existing experiment")
    s.add_argument("--trust-experiment", action="store_true",
                   help="resume an experiment whose Ray state this machine did not sign (Ray "
                   "unpickles it: only for a folder you trust)")
    s.add_argument("--address", help=address)
    s.add_argument("-v", "--verbose", action="store_true", help=verbose)
    s.add_argument("--report", action="store_true",
                   help="then write <experiment>/report.html (as `raysearch report` does)")
    s.set_defaults(func=cmd_tune)

    s = _command(sub, "ensemble", help="select members, score on test, write reports",
                 common=common, examples=("raysearch ensemble --top 4",
                                          ("raysearch ensemble --experiment demo --method "
                                           "greedy --top 8 --tta"),
                                          ("raysearch ensemble --experiment chexpert "
                                           "--test-data data/nih --format nih")))
    s.add_argument("--experiment", help="name, folder or URL (default: the most recent)")
    s.add_argument("--storage", default="reports", help="where experiments live")
    s.add_argument("--top", type=int, default=4, help="K members (top-k) / max rounds (greedy)")
    s.add_argument("--method", choices=["top", "greedy"], default="top",
                   help="top: the K best trials by val loss; greedy: forward selection on val")
    s.add_argument("--tta", action="store_true", help="horizontal-flip test-time augmentation")
    s.add_argument("--out", help="output folder (default <experiment>/ensemble)")
    s.add_argument("--n-boot", type=int, default=1000,
                   help="bootstrap resamples of the test studies for the confidence intervals")
    s.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    s.add_argument("--oof", action="store_true",
                   help="select on the out-of-fold predictions of `raysearch refit` (every "
                   "training study) instead of the val split; each member is then the mean of "
                   "its fold models")
    s.add_argument("--target-sensitivity", type=float, default=0.9,
                   help="per label, the threshold chosen on val reaches this sensitivity "
                        "(threshold_metrics.parquet)")
    s.add_argument("--worklist-rule", choices=["max", "noisy_or"], default="max",
                   help="P(any finding) of the triage worklist when the task has no "
                        "Sick (any-finding) label: the max over findings, or 1 - prod(1 - p)")
    s.add_argument("--test-data", metavar="ROOT",
                   help="cross-dataset test: also score the ensemble on this other dataset, "
                        "through the label mapping (e.g. CheXpert -> NIH)")
    s.add_argument("--format", help="data.format of --test-data (e.g. nih; default: detected)")
    s.add_argument("--report", action="store_true",
                   help="then write <experiment>/report.html (as `raysearch report` does)")
    s.set_defaults(func=cmd_ensemble)

    s = _command(sub, "refit", help="retrain the best configurations on k patient-grouped folds "
                 "for out-of-fold predictions", common=common,
                 examples=("raysearch refit --top 2 --folds 3",
                           ("raysearch refit --experiment demo --top 4 --folds 5 && "
                            "raysearch ensemble --experiment demo --oof")))
    s.add_argument("--experiment", help="name, folder or URL (default: the most recent)")
    s.add_argument("--storage", default="reports", help="where experiments live")
    s.add_argument("--top", type=int, default=2,
                   help="configurations to refit: the N trials with the lowest best val loss")
    s.add_argument("--folds", type=int,
                   help="k; the folds are saved as folds.parquet and reused by later refits "
                   "(default: the saved folds' k, else 5)")
    s.add_argument("--seed", type=int,
                   help="seed of the fold assignment (default: the saved folds', else 0)")
    s.add_argument("--address", help=address)
    s.add_argument("-v", "--verbose", action="store_true", help=verbose)
    s.set_defaults(func=cmd_refit)

    s = _command(sub, "status", help="an experiment's state, trials and time spent (no Ray)",
                 common=common, examples=("raysearch status", "raysearch status demo",
                                          "raysearch status gs://bucket/runs/mura"))
    s.add_argument("experiment", nargs="?",
                   help="name, folder or URL (default: the most recent under --storage)")
    s.add_argument("--storage", default="reports", help="where experiments live")
    s.set_defaults(func=cmd_status)

    s = _command(sub, "report", help="one self-contained offline HTML report of a search and "
                 "its ensembles (no Ray)",
                 common=common, examples=("raysearch report",
                                          "raysearch report --experiment demo --out demo.html"))
    s.add_argument("--experiment", help="name, folder or URL (default: the most recent under "
                   "--storage)")
    s.add_argument("--storage", default="reports", help="where experiments live")
    s.add_argument("--out", help="HTML file to write (default: <experiment>/report.html); the "
                   "figures also go to <out without .html>_figures/")
    s.set_defaults(func=cmd_report)

    s = _command(sub, "list", help="the experiments under a storage folder or URL",
                 common=common, examples=("raysearch list", "raysearch list gs://bucket/runs"))
    s.add_argument("storage", nargs="?", default="reports", help="folder or URL (default: reports)")
    s.set_defaults(func=cmd_list)

    s = _command(sub, "export", help="write an ensemble's members as TorchScript or ONNX files",
                 common=common, examples=(
                     "raysearch export --ensemble reports/demo --format onnx",
                     ("raysearch export --ensemble reports/demo/ensemble --format torchscript "
                      "--out exported/")))
    s.add_argument("--ensemble", required=True,
                   help="ensemble folder, or an experiment (its ensemble, else its best trial)")
    s.add_argument("--format", required=True, choices=["torchscript", "onnx"],
                   help="torchscript (torch.jit) or onnx (onnxruntime and others)")
    s.add_argument("--out", help="output folder (default: <ensemble>/export-<format>)")
    s.set_defaults(func=cmd_export)

    s = _command(sub, "predict", help="run a trained ensemble on new studies (PNG, JPEG, DICOM)",
                 common=common, examples=("raysearch predict studies/ --out predictions",
                                          ("raysearch predict study1/*.png --ensemble "
                                           "reports/demo/ensemble --tta")))
    s.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders of studies (any depth), a CSV of image_path and "
                   "study_id, or URLs of any of these")
    s.add_argument("--ensemble", help="ensemble or experiment folder (default: the most recent "
                   "experiment under --storage)")
    s.add_argument("--storage", default="reports", help="where experiments live")
    s.add_argument("--out", default="predictions", help="output folder")
    s.add_argument("--tta", action="store_true", help="horizontal-flip test-time augmentation")
    s.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    s.set_defaults(func=cmd_predict)

    s = _command(sub, "explain", help="where a trained ensemble looked: Grad-CAM, HiResCAM, "
                 "Grad-CAM++ or CAM maps, and a shortcut audit", common=common,
                 examples=("raysearch explain --worst 5",
                           "raysearch explain study1/*.png --method hirescam --label normal",
                           ("raysearch explain --studies valid/XR_WRIST/patient11185/study1 "
                            "--layer layer3"),
                           "raysearch explain --audit --data-root demo_data"))
    s.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files, folders of studies or a CSV (as predict takes them)")
    s.add_argument("--ensemble", help="ensemble or experiment folder (default: the most recent "
                   "experiment under --storage)")
    s.add_argument("--storage", default="reports", help="where experiments live")
    s.add_argument("--studies", nargs="+", metavar="ID", help="study ids of the experiment's data")
    s.add_argument("--worst", type=int, metavar="N",
                   help="the N most confident false positives and false negatives on test")
    s.add_argument("--method", default="gradcam", choices=["gradcam", "hirescam", "gradcam++",
                                                           "cam"], help="the map")
    s.add_argument("--label", help="the explained class: a label of the task, or normal (the "
                   "negated logit of a one-label task) (default: the task's first label)")
    s.add_argument("--layer", help="explain at this layer instead of the registered one (e.g. "
                   "layer3, features.denseblock3): finer maps at the same input size")
    s.add_argument("--out", default="explanations", help="output folder")
    s.add_argument("--audit", action="store_true",
                   help="score the maps against the synthetic data's boxes (annotations.parquet)")
    s.add_argument("--data-root", help="audit: the dataset with annotations.parquet (default: "
                   "the experiment's data root)")
    s.add_argument("--max-images", type=int, default=200, help="audit: test images scored")
    s.add_argument("--marker-threshold", type=float, default=0.01,
                   help="audit: flag a model whose share of map energy on markers exceeds this")
    s.set_defaults(func=cmd_explain)

    s = _command(sub, "serve", help="serve a trained ensemble over HTTP (Ray Serve)",
                 common=common, examples=("raysearch serve",
                                          ("raysearch serve --ensemble reports/demo/ensemble "
                                           "--port 8080 --replicas 2")))
    s.add_argument("--ensemble", help="ensemble or experiment folder (default: the most recent "
                   "experiment under --storage)")
    s.add_argument("--storage", default="reports", help="where experiments live")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port")
    s.add_argument("--replicas", type=int, default=1, help="copies of the model serving at once")
    s.add_argument("--max-batch-size", type=int, default=8,
                   help="studies batched into one forward pass, across clients")
    s.add_argument("--max-body-mb", type=float, default=64, help="largest request body (MB)")
    s.add_argument("--max-images", type=int, default=16, help="most images in one study")
    s.add_argument("--max-pixels", type=int, default=50_000_000,
                   help="most pixels in one image (read from its header, before decoding)")
    s.add_argument("--address", help=address)
    s.add_argument("-v", "--verbose", action="store_true", help=verbose)
    s.set_defaults(func=cmd_serve)

    s = _command(sub, "weights", help="pretrained weights", common=common,
                 examples=("raysearch weights fetch densenet169 --to gs://bucket/weights/",))
    ws = s.add_subparsers(dest="weights_command", required=True, metavar="COMMAND")
    archs = ", ".join(ARCHITECTURES)
    f = ws.add_parser(
        "fetch", help="stage torchvision's ImageNet weights into a folder or bucket",
        description="Stage torchvision's ImageNet weights of one architecture into a folder or\n"
        "bucket, for trials that run without internet.",
        epilog=_examples("raysearch weights fetch densenet169 --to gs://bucket/weights/",
                         "raysearch weights fetch resnet50 --to /data/weights/"),
        formatter_class=_HelpFormatter, parents=[common])
    f.add_argument("arch", metavar="ARCH", help=f"the architecture, one of: {archs}")
    f.add_argument("--to", required=True, help="folder or URL (gs://bucket/weights/)")
    f.set_defaults(func=cmd_weights_fetch)
    f = ws.add_parser(
        "stage-demo", help="stand-in pretrained weights for the CPU demo, trained here",
        description="Train a backbone on a separate synthetic dataset (another seed than the\n"
        "demo data's) and stage it, head removed, as a weights file that trials load offline:\n"
        "what the demo's finetune search (head, gradual, full) starts from where ImageNet\n"
        "weights cannot be downloaded. A few minutes on 2 CPU cores (4 epochs, small).",
        epilog=_examples("raysearch weights stage-demo",
                         "raysearch tune demo_finetune   # searches finetune from these weights"),
        formatter_class=_HelpFormatter, parents=[common])
    f.add_argument("--arch", default="resnet18", help=f"the architecture, one of: {archs}")
    f.add_argument("--to", default="demo_weights", help="folder; the file is <to>/<arch>.pt")
    f.add_argument("--image-size", type=int, default=64, help="pixels")
    f.add_argument("--epochs", type=int, default=4, help="training epochs on the source data")
    f.add_argument("--size", default="small", choices=["tiny", "small", "medium", "large"],
                   help="source dataset size")
    f.set_defaults(func=cmd_weights_stage_demo)

    s = _command(sub, "bench", help="measure speed, side by side in one run", common=common,
                 examples=("raysearch bench data", "raysearch bench step --arch resnet18",
                           "raysearch bench train --finetune head --arch densenet121",
                           "raysearch bench search --seeds 0 1",
                           "raysearch bench predict --ensemble reports/demo",
                           "raysearch bench serve --studies 300 --clients 16",
                           "raysearch bench explain --arch densenet121 --image-size 320"))
    s.add_argument("what", choices=["data", "step", "train", "search", "predict", "serve",
                                    "explain"],
                   help="what to measure")
    s.add_argument("--root", help="dataset (default: generated demo data)")
    s.add_argument("--image-size", type=int,
                   help="pixels (default: 128 for data, 64 for step and train, 224 for explain)")
    s.add_argument("--method", default="gradcam", choices=["gradcam", "hirescam", "gradcam++",
                                                           "cam"], help="explain: the map")
    s.add_argument("--n-images", type=int, default=512, help="data: images to decode")
    s.add_argument("--arch", default="resnet18", help="step, train, explain: the architecture")
    s.add_argument("--batch-size", type=int, default=32,
                   help="step, train, predict: images per step")
    s.add_argument("--steps", type=int, default=30,
                   help="step: timed batches per round; explain: timed images per round")
    s.add_argument("--finetune", choices=["head", "gradual", "full"],
                   help="train: a trial of this finetune mode against a full one, epoch steps "
                   "side by side, no Ray (default: the Ray trial against the pure model)")
    s.add_argument("--last-n-blocks", type=int, metavar="N",
                   help="train --finetune full|gradual: only the last N backbone blocks train")
    s.add_argument("--rounds", type=int,
                   help="data, step, train, predict, serve, explain: alternating rounds of the "
                   "two arms (default 5; train 3; predict, serve 4); the median of the paired "
                   "ratios is printed with its range")
    s.add_argument("--num-samples", type=int, help="search: trials per search (default 24)")
    s.add_argument("--max-epochs", type=int, help="search: epochs per trial (default 27)")
    s.add_argument("--grace-period", type=int, help="search: ASHA's first rung (default 3)")
    s.add_argument("--reduction-factor", type=float, help="search: ASHA's rate (default 3)")
    s.add_argument("--space", help="search: the search-space file (default: the demo's)")
    s.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="search: one pair of searches per seed")
    s.add_argument("--storage", help="search: keep the experiments here and continue them when "
                   "run again (default: a temp folder); predict, serve: where to find the most "
                   "recent experiment (default: reports)")
    s.add_argument("--ensemble", help="predict, serve: the ensemble or experiment folder "
                   "(default: the most recent experiment)")
    s.add_argument("--studies", type=int, default=300,
                   help="serve: studies sent per arm, over all rounds")
    s.add_argument("--clients", type=int, default=16,
                   help="serve: concurrent clients")
    # what the user did not give: an option left at its default is not refused where unread
    s.set_defaults(func=cmd_bench, bench_defaults={a.dest: a.default for a in s._actions
                                                   if a.dest in _BENCH_OPTIONS})
    return p


def _check_seeds(flag: str, seeds) -> None:
    """:func:`raysearch.config.check_seed` for each of ``seeds``, before any work."""
    from raysearch.config import check_seed

    for seed in seeds:
        check_seed(flag, seed)


# Commands that continue from their checkpoints when run again after Ctrl-C.
_RESUMABLE = frozenset({"tune", "train", "refit"})


def _refuse_empty(argv: Sequence[str]) -> None:
    """Raise :class:`ConfigError` for an empty value (``--out ''``, ``--storage=``, an empty
    INPUT: a shell variable that was not set): taken as given it meant the current folder
    (``predict --out ''`` wrote its files there and said ``-> :``) or was dropped for the file's
    setting without a word."""
    for i, token in enumerate(argv):
        if token.startswith("--") and token.endswith("=") and len(token) > 3:
            raise ConfigError(f"{token[:-1]}: empty value (an unset shell variable?)")
        if token.strip() == "":
            before = argv[i - 1] if i else ""
            what = before if before.startswith("-") and "=" not in before else "an argument"
            raise ConfigError(f"{what}: empty value (an unset shell variable?)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from raysearch.logs import log_path, quiet_libraries

    quiet_libraries(verbose=getattr(args, "verbose", False), command=args.command)
    debug = args.debug or bool(os.environ.get("RAYSEARCH_DEBUG"))
    try:
        _refuse_empty(argv)
        return args.func(args)
    except RaysearchError as e:
        if debug:
            raise
        from raysearch.errors import plain  # messages may quote a library's coloured text

        print(f"raysearch: error: {plain(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        # Only the commands that keep their progress resume; the others start over.
        what = ("run the same command to resume" if args.command in _RESUMABLE
                else f"`raysearch {args.command}` starts over when run again")
        print(f"raysearch: interrupted; {what}", file=sys.stderr)
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
