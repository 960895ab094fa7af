"""The device check behind ``scripts/gpu_check.sh``: the CUDA, AMP, channels_last and DDP paths,
run for real, one line per check with its figures. ``--cpu`` runs the same checks in small on a
CPU (a test runs that).

It needs only torch, torchvision, numpy, pandas, pyarrow, Pillow, PyYAML and rich: the GPU
machine it was written for has no Ray, no Optuna and no fsspec. The Ray check runs when Ray
happens to be importable, and says it was skipped otherwise.

Checks:

- ``step``: the epoch step (:func:`raysearch.train.loop.train_epoch` on uint8 batches through the
  loader and on-device augmentation) against the model alone, bf16 autocast and channels_last on
  CUDA: DenseNet-169 at 320 px and ResNet-50 at 224 px (``--cpu``: MobileNetV3 at 64 px). The
  target is a ratio >= 0.9.
- ``predictor``: a two-member ensemble (two architectures, two image sizes) on generated images,
  on the device and on the CPU in float32: the largest probability difference and how many
  decisions agree.
- ``ddp``: one training epoch and precise BatchNorm under ``DistributedDataParallel`` (nccl on
  CUDA, gloo on a CPU; one rank), as a Ray Train worker runs it.
- ``ray``: a whole trial under Ray Train on the device (when Ray is importable).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["main"]


def _line(name: str, ok: bool, text: str) -> bool:
    print(f"check {name:9s} {'ok  ' if ok else 'FAIL'} {text}", flush=True)
    return ok


def _run(name: str, fn: Callable[[], tuple[bool, str]]) -> bool:
    try:
        ok, text = fn()
    except Exception as e:  # noqa: BLE001 - a failing check is reported, and the others still run
        traceback.print_exc(file=sys.stderr)
        return _line(name, False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return _line(name, ok, text)


def check_step(device: torch.device, *, small: bool) -> list[tuple[str, Callable]]:
    from raysearch.bench.step import bench_step

    cases = ([("mobilenet_v3_small", 64, 8, 3)] if small
             else [("densenet169", 320, 32, 20), ("resnet50", 224, 64, 30)])

    def one(arch, size, batch, steps):
        def fn():
            r = bench_step(arch=arch, image_size=size, batch_size=batch, steps=steps,
                           warmup=2 if small else 5, rounds=2 if small else 5, device=device)
            ok = small or (r["ratio"] is not None and r["ratio"] >= 0.9)
            return ok, (f"{arch} {size}px batch {batch} {r['amp']}"
                        f"{' channels_last' if r['channels_last'] else ''}: model alone "
                        f"{r['pure_images_per_s']:.1f} img/s, epoch step "
                        f"{r['step_images_per_s']:.1f} img/s, ratio {r['ratio_text']}"
                        + ("" if small else " (target >= 0.9)"))
        return fn

    return [("step", one(*c)) for c in cases]


def _members(folder: str, *, small: bool):
    """Two members as raysearch writes their checkpoints, with seeded random weights."""
    from raysearch.config import TrialConfig
    from raysearch.data.mura import MURA_TASK
    from raysearch.experiment import TrialCheckpoint
    from raysearch.models.factory import create_model

    specs = [("mobilenet_v3_small", 48), ("resnet18", 64)] if small else \
        [("densenet121", 320), ("resnet50", 224)]
    members = []
    for i, (arch, size) in enumerate(specs):
        path = os.path.join(folder, f"train-m{i}", "checkpoint_000001")
        os.makedirs(path)
        torch.manual_seed(i)
        torch.save(create_model(arch).state_dict(), os.path.join(path, "model.pt"))
        cfg = TrialConfig(arch=arch, weights="none", image_size=size)
        with open(os.path.join(path, "trial.json"), "w") as f:
            json.dump(cfg.to_dict(), f)
        members.append(TrialCheckpoint(f"m{i}", path, cfg, MURA_TASK))
    return members


def check_predictor(device: torch.device, *, small: bool) -> tuple[bool, str]:
    from raysearch.data.mura import MURA_TASK
    from raysearch.inference.predictor import Predictor

    n = 16 if small else 64
    rng = np.random.default_rng(0)
    # Generated "radiographs": uint16 frames of varying aspect, as a DICOM export would hold.
    images = [rng.integers(0, 4096, size=(int(rng.integers(200, 400)), int(rng.integers(200, 400))))
              .astype(np.uint16) for _ in range(n)]
    with tempfile.TemporaryDirectory() as folder:
        members = _members(folder, small=small)
        t0 = time.perf_counter()
        here = Predictor(members, weights=[2, 1], task=MURA_TASK, device=device).predict(images)
        seconds = time.perf_counter() - t0
        cpu = Predictor(members, weights=[2, 1], task=MURA_TASK, device="cpu").predict(images)
    diff = float(np.abs(here.probs - cpu.probs).max())
    agree = int(((here.probs > 0.5) == (cpu.probs > 0.5)).sum())
    # bf16 keeps 8 bits of mantissa: a probability may move by about 1e-2, rarely more.
    ok = diff <= 0.05 and agree >= n - 1
    return ok, (f"2 members on {n} generated images on {device.type}: {n / seconds:.1f} img/s; "
                f"against float32 on the CPU: max |dp| {diff:.4f}, decisions agree {agree}/{n}")


def check_ddp(device: torch.device, *, small: bool) -> tuple[bool, str]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from raysearch.config import TrialConfig
    from raysearch.data.augment import DeviceAugment
    from raysearch.data.cache import ArrayStore
    from raysearch.data.loader import BatchLoader
    from raysearch.models.factory import create_model, recompute_bn_stats
    from raysearch.train.loop import bn_batches, make_optimizer, train_epoch

    cuda = device.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group(backend, init_method=f"file://{folder}/rendezvous", rank=0,
                                world_size=1)
        try:
            arch, size, batch = ("mobilenet_v3_small", 64, 8) if small else ("resnet50", 224, 32)
            cfg = TrialConfig(arch=arch, weights="none", image_size=size, batch_size=batch,
                              augment="mura", lr=1e-4)
            torch.manual_seed(0)
            model = create_model(arch).to(device)
            if cuda:
                model = model.to(memory_format=torch.channels_last)
            ddp = DistributedDataParallel(model, device_ids=[device.index or 0] if cuda else None)
            rng = np.random.default_rng(0)
            n = batch * 4
            store = ArrayStore(rng.integers(0, 256, size=(n, size, size), dtype=np.uint8))
            labels = (rng.random((n, 1)) > 0.5).astype(np.float32)
            loader = BatchLoader(store, np.arange(n), labels, batch_size=batch, shuffle=True,
                                 rank=0, world_size=1, pin_memory=cuda)
            augment = DeviceAugment(cfg.augment_params(), device=device, seed=0,
                                    channels_last=cuda)
            r = train_epoch(ddp, loader, augment=augment,
                            optimizer=make_optimizer(cfg, ddp.parameters()),
                            scaler=torch.amp.GradScaler("cuda", enabled=False),
                            weight_by_row=torch.ones(n, 1), device=device)
            batches = recompute_bn_stats(model, bn_batches(
                store, np.arange(n), augment, n_images=n, batch_size=batch, seed=0, epoch=1,
                rank=0, world=1, device=device))
        finally:
            dist.destroy_process_group()
    ok = math.isfinite(r.loss) and batches > 0
    return ok, (f"{backend}, {arch} {size}px: one epoch {r.images / r.seconds:.1f} img/s, "
                f"loss {r.loss:.3f}; precise BN over {batches} batches (all-reduced)")


def check_ray(device: torch.device, *, small: bool) -> tuple[bool, str] | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return None
    import io

    from rich.console import Console

    from raysearch.bench.pipeline import bench_train
    from raysearch.data.synth import make_demo_data

    arch, size, batch = ("mobilenet_v3_small", 32, 16) if small else ("resnet50", 224, 64)
    with tempfile.TemporaryDirectory() as data:
        make_demo_data(data, seed=0, size="tiny" if small else "small")
        r = bench_train(root=data, arch=arch, image_size=size, batch_size=batch, rounds=1,
                        gpus=1.0 if device.type == "cuda" else 0.0,
                        console=Console(file=io.StringIO()))
    ok = math.isfinite(r["trial_images_per_s"]) and r["trial_images_per_s"] > 0
    return ok, (f"a whole {arch} {size}px trial (1 epoch, generated data) under Ray Train on "
                f"{device.type}: {r['trial_images_per_s']:.1f} img/s, validation "
                f"{r['val_time_s']:.2f} s, checkpoint {r['checkpoint_write_s']:.2f} s")


def check_finetune(device: torch.device, *, small: bool) -> tuple[bool, str]:
    """A ``head`` trial's epoch steps on the device (AMP, channels_last on CUDA): the frozen
    backbone, BatchNorm statistics included, is bit-for-bit unchanged, the head moved; and its
    speed against a ``full`` trial's (``raysearch bench train --finetune head``)."""
    import numpy as np

    from raysearch.bench.step import bench_finetune
    from raysearch.config import TrialConfig
    from raysearch.data.augment import DeviceAugment
    from raysearch.data.cache import ArrayStore
    from raysearch.data.loader import BatchLoader
    from raysearch.models.factory import create_model
    from raysearch.models.finetune import optimizer_groups, set_trainable
    from raysearch.train.loop import make_optimizer, train_epoch

    arch, size, batch = ("resnet18", 64, 8) if small else ("densenet121", 224, 32)
    cuda = device.type == "cuda"
    model = create_model(arch).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    set_trainable(model, arch, backbone=False)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = TrialConfig(arch=arch, weights="imagenet", finetune="head", image_size=size, lr=1e-2)
    rng = np.random.default_rng(0)
    store = ArrayStore(rng.integers(0, 256, size=(4 * batch, size, size), dtype=np.uint8))
    loader = BatchLoader(store, np.arange(4 * batch), (rng.random((4 * batch, 1)) > 0.5)
                         .astype(np.float32), batch_size=batch, shuffle=False, pin_memory=cuda)
    train_epoch(model, loader, augment=DeviceAugment(cfg.augment_params(), device=device, seed=0,
                                                     channels_last=cuda),
                optimizer=make_optimizer(cfg, optimizer_groups(model, arch, mode="head", lr=1e-2,
                                                               backbone_lr_mult=1.0)),
                scaler=torch.amp.GradScaler("cuda", enabled=False),
                weight_by_row=torch.ones(4 * batch, 1), device=device)
    after = model.state_dict()
    head = [k for k in before if k.startswith(("classifier.", "fc."))]
    moved = [k for k in before if k not in head and not torch.equal(before[k], after[k])]
    head_moved = any(not torch.equal(before[k], after[k]) for k in head)
    r = bench_finetune(arch=arch, image_size=size, batch_size=batch, mode="head",
                       steps=3 if small else 20, warmup=1 if small else 3,
                       rounds=2 if small else 3, device=device)
    return not moved and head_moved, (
        f"{arch} {size}px head trial: {len(moved)} backbone tensors moved (want 0), head "
        f"{'moved' if head_moved else 'DID NOT MOVE'}; head {r['mode_images_per_s']:.1f} img/s vs "
        f"full {r['full_images_per_s']:.1f} img/s ({r['speedup']:.2f}x)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the same checks in small, on the CPU")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray Train check")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("scripts/gpu_check.sh: no CUDA device here; use --cpu for the small CPU run",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda:0")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    print(f"device   {name}; torch {torch.__version__}, cuda {torch.version.cuda}, "
          f"bf16 {'yes' if bf16 else 'no'}, {os.cpu_count()} CPU cores", flush=True)
    results = [_run(n, fn) for n, fn in check_step(device, small=args.cpu)]
    results.append(_run("finetune", lambda: check_finetune(device, small=args.cpu)))
    results.append(_run("predictor", lambda: check_predictor(device, small=args.cpu)))
    results.append(_run("ddp", lambda: check_ddp(device, small=args.cpu)))
    if args.no_ray:
        _line("ray", True, "skipped (--no-ray)")
    else:
        try:
            import ray  # noqa: F401

            results.append(_run("ray", lambda: check_ray(device, small=args.cpu)))
        except ImportError:
            _line("ray", True, "skipped: ray is not installed here")
    print(f"{sum(results)}/{len(results)} checks passed", flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
