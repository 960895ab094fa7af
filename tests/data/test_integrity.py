"""Tests for image integrity (data stage): complete means the end chunk or marker is found by
walking the file's structure, whatever follows it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from raysearch.data.images import preprocess_image
from raysearch.data.integrity import image_end, image_problem


def _encode(fmt: str, **options) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 80), dtype=np.uint8), mode="L")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


ENCODINGS = {
    "png": ("PNG", {}),
    "jpeg": ("JPEG", {"quality": 90}),
    "jpeg-progressive": ("JPEG", {"progressive": True}),
    "jpeg-restart-markers": ("JPEG", {"restart_marker_blocks": 1}),
    "jpeg-exif-thumbnail-like": ("JPEG", {"exif": b"Exif\x00\x00" + b"\xff\xd9" * 8}),
}


def _problem(data: bytes, expect: str = "PNG or JPEG") -> str | None:
    return image_problem(lambda a, b: data[a:b], len(data), expect=expect)


@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("padding", [b"", b"\x00" * 1000, b"\xff\xd9junk IEND\xaeB`\x82"])
def test_complete_files_pass_whatever_follows_the_end(name, padding):
    fmt, options = ENCODINGS[name]
    data = _encode(fmt, **options)
    assert image_end(data + padding) == len(data)
    assert _problem(data + padding) is None
    # the decoder agrees: the padded file decodes to the same pixels
    assert np.array_equal(preprocess_image(data + padding, image_size=32),
                          preprocess_image(data, image_size=32))


@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("cut", [1, 2, 13, 200])
def test_truncated_files_are_found_even_when_padded(name, cut):
    fmt, options = ENCODINGS[name]
    data = _encode(fmt, **options)[:-cut]
    want = "truncated PNG (no IEND chunk)" if fmt == "PNG" else "truncated JPEG (no EOI marker)"
    assert image_end(data) is None
    assert _problem(data) == want
    assert _problem(data + b"\x00" * 64) == want


def test_signature_and_size():
    assert _problem(b"") == "not a readable PNG or JPEG (0 bytes)"
    assert _problem(b"GIF89a" + b"\x00" * 40) == "not a PNG or JPEG (bad signature)"
    jpeg = _encode("JPEG")
    assert _problem(jpeg, expect="PNG") == "not a PNG (bad signature)"
    assert _problem(jpeg) is None
