"""Data stage: dataset readers (MURA today), the task a dataset poses, the patient split, one
image's decode-and-preprocess, the decode-once cache, batch loading and augmentation, the synthetic
demo data, and what the driver prepares once. Never imports ray.
"""

from __future__ import annotations

import importlib

# Public names of the stage, imported from their module on first use (importing the package
# stays cheap: no torch until a name that needs it is used).
_EXPORTS = {
    "BatchLoader": "loader",
    "DeviceAugment": "augment",
    "ImageCache": "cache",
    "build_cache": "cache",
    "check_free_space": "prepare",
    "find_mura_root": "roots",
    "make_demo_data": "synth",
    "open_cache": "cache",
    "prepare_data": "prepare",
    "preprocess_image": "images",
    "read_dataset": "prepare",
    "read_mura": "mura",
    "resolve_augment": "augment_params",
    "split_patients": "split",
    "summarize": "mura",
    "summary_table": "mura",
}
__all__ = ["BatchLoader", "DeviceAugment", "ImageCache", "build_cache", "check_free_space", "find_mura_root", "make_demo_data", "open_cache", "prepare_data", "preprocess_image", "read_dataset", "read_mura", "resolve_augment", "split_patients", "summarize", "summary_table"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
