"""Data stage, one image: decode and preprocess it the one way every stage does.

The decode-once cache stores exactly what :func:`preprocess_image` returns, and the predictor runs
the same function on new files, so a prediction from the cache and one from the raw file agree.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from raysearch.data.dicom import is_dicom, read_dicom
from raysearch.errors import ConfigError, DataError
from raysearch.storage import read_bytes

__all__ = ["PREPROCESS_VERSION", "decode_gray", "letterbox", "preprocess_image",
           "preprocess_image_sizes"]


# Bump whenever preprocess_image changes its output: the version is part of every cache key.
PREPROCESS_VERSION = 1

_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}

def preprocess_image(data: bytes | str | np.ndarray | Image.Image, *, image_size: int) -> np.ndarray:
    """Decode one image to an ``(image_size, image_size)`` uint8 grayscale array.

    ``data`` is encoded bytes (PNG, JPEG, ... or DICOM, told by its ``DICM`` magic and read by
    :mod:`raysearch.data.dicom`), a local path or fsspec URL, a decoded array (``H x W`` or
    ``H x W x C``, any integer or float dtype) or a PIL image. Colour and alpha are dropped
    (ITU-R 601 luma); 16-bit, 32-bit and float images are stretched from their own min..max to
    0..255 (a fixed /257 would leave 12-bit radiographs nearly black). The image is zero-padded
    to a centred square (letterbox, black bars) and resized with antialiased bilinear filtering.
    Raises :class:`DataError` naming the image when it is missing or cannot be decoded.
    """
    return preprocess_image_sizes(data, image_sizes=[image_size])[image_size]


def preprocess_image_sizes(
    data: bytes | str | np.ndarray | Image.Image, *, image_sizes: Sequence[int]
) -> dict[int, np.ndarray]:
    """:func:`preprocess_image` at several sizes from one decode: ``{S: (S, S) uint8}``.
    Raises :class:`ConfigError` for a size < 1 and :class:`DataError` as it does."""
    if not image_sizes or min(image_sizes) < 1:
        raise ConfigError(f"image sizes must be >= 1, got {list(image_sizes)}")
    gray = decode_gray(data)
    return {s: letterbox(gray, image_size=s) for s in image_sizes}


def decode_gray(data: bytes | str | np.ndarray | Image.Image) -> Image.Image:
    """One image (as :func:`preprocess_image` takes it) decoded to a grayscale PIL image (mode
    ``L``), before letterboxing. Raises :class:`DataError` naming the image."""
    if isinstance(data, np.ndarray):
        return _array_to_gray(data)
    if isinstance(data, Image.Image):
        return _to_gray(data)
    name = data if isinstance(data, str) else "<bytes>"
    try:
        raw = read_bytes(data) if isinstance(data, str) else data
    except FileNotFoundError:
        raise DataError(f"image not found: {name}") from None
    except OSError as e:
        raise DataError(f"cannot read image {name}: {e.strerror or e}") from None
    if is_dicom(raw):  # PS3.10 files: the standard's grey-level pipeline first (data.dicom)
        return _array_to_gray(read_dicom(raw, name=name).pixels)
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            return _to_gray(img)
    except UnidentifiedImageError:
        raise DataError(f"cannot decode image {name}: not a PNG, JPEG or DICOM image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {name}: {e}") from None


def letterbox(gray: Image.Image, *, image_size: int) -> np.ndarray:
    """A grayscale (mode ``L``) image zero-padded to a centred square, then resized to
    ``image_size`` with antialiased bilinear filtering: ``(image_size, image_size)`` uint8."""
    w, h = gray.size
    side = max(w, h)
    if w != h:
        square = Image.new("L", (side, side), 0)
        square.paste(gray, ((side - w) // 2, (side - h) // 2))
        gray = square
    if side != image_size:
        # reducing_gap: box-reduce by an integer factor first, then bilinear; still antialiased.
        gray = gray.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.array(gray, dtype=np.uint8)  # a writable copy: callers may hand it to torch


def _array_to_gray(a: np.ndarray) -> Image.Image:
    """A decoded array as a mode-L image, by the same rules as a decoded file."""
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        if a.shape[-1] == 1:
            a = a[..., 0]
        elif a.dtype == np.uint8:
            return Image.fromarray(np.ascontiguousarray(a[..., :3]), mode="RGB").convert("L")
        else:
            a = a[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma
    if a.ndim != 2:
        raise DataError(f"expected an H x W or H x W x C image array, got shape {a.shape}")
    if a.dtype == np.uint8:
        return Image.fromarray(a, mode="L")
    a = a.astype(np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def _to_gray(img: Image.Image) -> Image.Image:
    if img.mode == "L":
        return img
    if img.mode in _HIGH_DEPTH_MODES:
        a = np.asarray(img).astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    return img.convert("L")  # RGB(A), LA, P, PA, 1, CMYK, YCbCr
