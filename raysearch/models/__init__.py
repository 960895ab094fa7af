"""Models stage: the registry of architectures (torch-free), the factory that builds them with
raysearch's head, and the weights they start from. Never imports ray.
"""

from __future__ import annotations

import importlib

# Public names of the stage, imported from their module on first use (importing the package
# stays cheap: no torch until a name that needs it is used).
_EXPORTS = {
    "ARCHITECTURES": "registry",
    "check_arch": "registry",
    "check_weights": "factory",
    "checkpoint_bytes": "factory",
    "create_model": "factory",
    "fetch_weights": "weights",
    "load_checkpoint_weights": "weights",
    "load_weights_file": "weights",
    "recompute_bn_stats": "factory",
    "torchvision_weights_info": "weights",
}
__all__ = ["ARCHITECTURES", "check_arch", "check_weights", "checkpoint_bytes", "create_model", "fetch_weights", "load_checkpoint_weights", "load_weights_file", "recompute_bn_stats", "torchvision_weights_info"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
