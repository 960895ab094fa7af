"""Models stage, the registry: the architectures raysearch builds and what it needs to know about
each, by name. Torch-free, so that configuration can be checked without importing torch.
"""

from __future__ import annotations

from raysearch.errors import ConfigError

__all__ = ["ARCHITECTURES", "check_arch"]


# arch -> the attribute holding the final Linear layer that becomes the single-logit head.
# "classifier[-1]" means the last element of the ``classifier`` Sequential (the rest is kept, so
# the built-in dropout of vgg/efficientnet/mobilenet classifiers stays and `dropout` adds to it).
ARCHITECTURES: dict[str, str] = {
    **{f"densenet{n}": "classifier" for n in (121, 161, 169, 201)},
    **{f"resnet{n}": "fc" for n in (18, 34, 50, 101)},
    **{name: "classifier[-1]" for name in ("vgg16", "vgg16_bn", "vgg19_bn")},
    **{f"efficientnet_b{n}": "classifier[-1]" for n in range(5)},
    "convnext_tiny": "classifier[-1]",
    "mobilenet_v3_small": "classifier[-1]",
    "mobilenet_v3_large": "classifier[-1]",
}

def check_arch(arch: str) -> None:
    """Raise :class:`ConfigError` naming the allowed architectures unless ``arch`` is one."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHITECTURES)}")
