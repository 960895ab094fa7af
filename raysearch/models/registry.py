"""Models stage, the registry: the architectures raysearch builds and what it needs to know about
each, by name. Torch-free, so that configuration can be checked without importing torch.
"""

from __future__ import annotations

from raysearch.errors import ConfigError

__all__ = ["ARCHITECTURES", "BLOCKS", "check_arch", "num_blocks"]


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

# arch family -> how many blocks its backbone has for ``finetune``'s ``last_n_blocks`` (the stem
# before the first block is never counted; ``raysearch.models.finetune.backbone_blocks`` lists the
# modules of each, and a test checks the two agree for every architecture):
#   densenet: denseblock1+transition1, ..., denseblock4+norm5 (4)
#   resnet: layer1 .. layer4 (4)
#   vgg: the 5 conv stages between max-pools, then fc6+fc7 of the classifier (6)
#   efficientnet: features[1] .. features[8] (8)
#   convnext: features[1] .. features[7], the last with the classifier's LayerNorm (7)
#   mobilenet_v3: features[1] .. features[-1], then the classifier's hidden Linear (13 / 17)
BLOCKS: dict[str, int] = {
    **{f"densenet{n}": 4 for n in (121, 161, 169, 201)},
    **{f"resnet{n}": 4 for n in (18, 34, 50, 101)},
    **{name: 6 for name in ("vgg16", "vgg16_bn", "vgg19_bn")},
    **{f"efficientnet_b{n}": 8 for n in range(5)},
    "convnext_tiny": 7,
    "mobilenet_v3_small": 13,
    "mobilenet_v3_large": 17,
}


def num_blocks(arch: str) -> int:
    """How many backbone blocks ``arch`` has for ``last_n_blocks``; ConfigError for an unknown arch."""
    check_arch(arch)
    return BLOCKS[arch]


def check_arch(arch: str) -> None:
    """Raise :class:`ConfigError` naming the allowed architectures unless ``arch`` is one."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHITECTURES)}")
