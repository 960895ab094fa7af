"""Data stage: dataset readers (MURA, CheXpert, ChestX-ray14, a CSV manifest), label policies,
the task a dataset poses, the patient split, one image's decode-and-preprocess, the decode-once
cache, batch loading and augmentation, the synthetic demo data, and what the driver prepares
once. Never imports ray.
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
    "detect_format": "formats",
    "find_mura_root": "roots",
    "make_chexpert_demo": "synth_chest",
    "make_demo_data": "synth",
    "make_nih_demo": "synth_chest",
    "open_cache": "cache",
    "prepare_data": "prepare",
    "preprocess_image": "images",
    "read_chexpert": "chexpert",
    "read_csv_manifest": "manifest_csv",
    "read_dataset": "prepare",
    "read_mura": "mura",
    "read_nih": "nih",
    "resolve_augment": "augment_params",
    "split_patients": "split",
    "summarize": "mura",
    "summary_table": "mura",
}
__all__ = ["BatchLoader", "DeviceAugment", "ImageCache", "build_cache", "check_free_space", "detect_format", "find_mura_root", "make_chexpert_demo", "make_demo_data", "make_nih_demo", "open_cache", "prepare_data", "preprocess_image", "read_chexpert", "read_csv_manifest", "read_dataset", "read_mura", "read_nih", "resolve_augment", "split_patients", "summarize", "summary_table"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
