"""The serve app's error shape and limits, without Ray: FastAPI's own errors (unknown path, wrong
method, malformed request) answer the same ``{"error": ...}`` JSON as the app's, and the pixel
limit a user sets is the one that holds, above Pillow's built-in guard."""

from __future__ import annotations

import io

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from raysearch.serve.app import Limits, RequestError, _check_pixels, allow_pixels, json_errors


@pytest.fixture
def client():
    api = FastAPI()
    json_errors(api)

    @api.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @api.get("/items/{n}")
    async def item(n: int):
        return {"n": n}

    return TestClient(api)


@pytest.mark.parametrize(("method", "path", "status", "message"), [
    ("GET", "/nope", 404, "no endpoint /nope; the endpoints are POST /v1/predict"),
    ("DELETE", "/healthz", 405, "DELETE is not allowed on /healthz"),
    ("GET", "/items/abc", 422, "invalid request"),
])
def test_every_error_is_json_with_an_error_key(client, method, path, status, message):
    r = client.request(method, path)
    assert r.status_code == status
    body = r.json()
    assert set(body) == {"error"} and body["error"].startswith(message)


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_pixel_limit_above_pillows_guard_is_the_one_that_holds(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    big = _png_header(15_000, 15_000)  # 225 M pixels: over twice Pillow's default guard
    limits = Limits(max_pixels=300_000_000)
    allow_pixels(limits.max_pixels)
    _check_pixels(big, name="big.png", limits=limits)  # allowed: under the user's limit
    with pytest.raises(RequestError, match="225,000,000 pixels, over the limit of 200,000,000"):
        _check_pixels(big, name="big.png", limits=Limits(max_pixels=200_000_000))
    # A lower limit never lowers Pillow's own guard.
    allow_pixels(10)
    assert Image.MAX_IMAGE_PIXELS == 300_000_000
    with Image.open(io.BytesIO(big)) as img:
        assert img.size == (15_000, 15_000)
