"""Benchmark, explanations: one Grad-CAM (or HiResCAM, Grad-CAM++, CAM) per image against one
forward and backward pass of the same model, side by side in alternating rounds. Generated
images, no dataset and no Ray.

The Grad-CAM arm is :func:`raysearch.explain.maps.member_maps` on one image: the library's hooks
put on and taken off, the forward pass, the gradient of the explained logit with respect to the
layer, and the map (unnormalised, at the layer's resolution). The reference arm is
``model(x)`` then ``loss.backward()`` on the same image, in float32 like the explanation. An
ensemble explains each member in turn: it costs its member count times this.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["bench_explain"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_explain(
    *,
    arch: str,
    image_size: int,
    method: str = "gradcam",
    steps: int = 20,
    warmup: int = 3,
    rounds: int = 5,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Images per second of explanations and of forward + backward, one image at a time, and the
    paired ratio of their times (``ratio`` = Grad-CAM time / forward-backward time; the target is
    <= 1.5). Each of ``rounds`` rounds times ``steps`` images per arm after ``warmup`` untimed
    ones (:func:`raysearch.bench.paired.alternate`)."""
    import statistics

    from raysearch.bench.paired import alternate, paired_ratio
    from raysearch.data.mura import MURA_TASK
    from raysearch.explain.maps import ExplainedNet, member_maps, resolve_target
    from raysearch.inference.predictor import best_device
    from raysearch.models.factory import create_model

    device = torch.device(device) if device is not None else best_device()
    torch.manual_seed(seed)
    model = create_model(arch).to(device).eval()
    net = ExplainedNet(model, arch)
    target = resolve_target(MURA_TASK, None)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(1, 3, image_size, image_size, generator=gen).to(device)

    def explain_once() -> None:
        member_maps(net, x, method=method, target=target)

    def forward_backward_once() -> None:
        model.zero_grad(set_to_none=True)
        model(x)[:, 0].sum().backward()

    def timed(fn):
        def arm(_: int) -> float:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(device)
            return steps / (time.perf_counter() - t0)
        return arm

    for _ in range(warmup):
        explain_once()
        forward_backward_once()
    pairs = alternate(timed(explain_once), timed(forward_backward_once), rounds=rounds)
    ratio = paired_ratio(pairs)  # forward-backward rate / explanation rate = time ratio
    return {
        "arch": arch, "image_size": image_size, "method": method, "device": str(device),
        "rounds": rounds, "steps": steps,
        "explain_images_per_s": statistics.median(a for a, _ in pairs),
        "fb_images_per_s": statistics.median(b for _, b in pairs),
        "ratio": ratio.median, "ratio_low": ratio.low, "ratio_high": ratio.high,
        "ratio_text": ratio.text(),
    }
