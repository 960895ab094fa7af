"""Models stage, the registry: the architectures raysearch builds and what it needs to know about
each, by name. Torch-free, so that configuration can be checked without importing torch.
"""

from __future__ import annotations

import os

from raysearch.errors import ConfigError, WeightsError

__all__ = ["ARCHITECTURES", "BLOCKS", "CAM_HEADS", "CAM_LAYERS", "cam_layer", "check_arch",
           "check_weights_file", "num_blocks"]


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


def check_weights_file(source: str, *, arch: str) -> str | None:
    """The local file a ``weights`` setting names, when it names one, which must be there.

    ``none``, ``imagenet`` and URLs give None: what they need (a download, a bucket) is checked
    where torch is loaded (:func:`raysearch.models.factory.check_weights`). A path is checked with
    the file system alone, so that ``weights: /wrong/path.pt`` is answered before torch or Ray
    starts. Returns the absolute path; raises :class:`WeightsError` naming it (and how to stage
    the demo's stand-in weights when it is one of theirs).
    """
    if source in ("none", "imagenet") or ("://" in source and not source.startswith("file://")):
        return None
    path = os.path.abspath(os.path.expanduser(source.removeprefix("file://")))
    if not os.path.isfile(path):
        if os.path.basename(os.path.dirname(path)) == "demo_weights":
            raise WeightsError(f"weights file not found: {source}; stage the demo's stand-in "
                               f"weights first: raysearch weights stage-demo --arch {arch}")
        raise WeightsError(
            f"weights file not found: {source} (weights must be 'none', 'imagenet', "
            "a file path or a URL)"
        )
    return path


# arch -> the layer whose output class activation maps are computed on (raysearch explain), as a
# module path of the torchvision model (``model.get_submodule``). All sit at stride 32: a 7 x 7
# map at 224 px, 16 x 16 at 512 px; ``raysearch explain --layer`` picks an earlier one instead of
# a larger input, which would change the prediction being explained.
#
# ``relu5`` is not a torchvision module: torchvision's DenseNet applies its last ReLU as
# ``F.relu(features, inplace=True)`` after ``norm5``. A hook on ``norm5`` keeps a CPU tensor
# that the in-place ReLU then overwrites (grad-cam stores ``output.cpu()``, a view on the CPU,
# a copy on CUDA), so maps differed between CPU and GPU. raysearch.explain runs DenseNet through
# a wrapper whose ``relu5`` is an out-of-place ReLU module: the tensor after the final ReLU,
# the same on every device.
CAM_LAYERS: dict[str, str] = {
    **{f"densenet{n}": "relu5" for n in (121, 161, 169, 201)},
    **{f"resnet{n}": "layer4" for n in (18, 34, 50, 101)},
    **{name: "features" for name in ("vgg16", "vgg16_bn", "vgg19_bn")},
    **{f"efficientnet_b{n}": "features" for n in range(5)},
    "convnext_tiny": "features",
    "mobilenet_v3_small": "features",
    "mobilenet_v3_large": "features",
}

# Architectures whose CAM layer feeds global average pooling and then the linear head directly
# (dropout aside), so that the class activation map of Zhou et al. (CVPR 2016, "Learning Deep
# Features for Discriminative Localization"), sum_c w_c A_c, is defined: VGG's and MobileNetV3's
# heads have hidden layers, ConvNeXt's normalises after pooling.
CAM_HEADS: frozenset[str] = frozenset(
    [f"densenet{n}" for n in (121, 161, 169, 201)]
    + [f"resnet{n}" for n in (18, 34, 50, 101)]
    + [f"efficientnet_b{n}" for n in range(5)]
)


def cam_layer(arch: str) -> str:
    """The registered CAM layer of ``arch`` (see :data:`CAM_LAYERS`). Raises
    :class:`ConfigError` naming the architecture when it has none."""
    if arch not in CAM_LAYERS:
        raise ConfigError(f"architecture {arch!r} has no registered explanation layer (add it to "
                          f"raysearch.models.registry.CAM_LAYERS, or pass --layer NAME)")
    return CAM_LAYERS[arch]

