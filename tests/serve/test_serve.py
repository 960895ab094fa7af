"""`raysearch serve` answers real HTTP: start, predict, model, health, bad images, limits, a
reload on SIGHUP, shutdown. One server process for the module (it starts Ray and Serve)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import httpx
import numpy as np
import pytest

from raysearch.data.mura import read_mura
from raysearch.inference.predictor import Predictor
from tests.inference.test_predictor import two_member_ensemble

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    exp = tmp / "exp"
    two_member_ensemble(exp, column="checkpoint")  # an earlier release's column name
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A short RAY_TMPDIR: the dashboard's AF_UNIX sockets live under it (at most 107 bytes).
    ray_tmp = tempfile.mkdtemp(prefix="rs-serve-", dir="/tmp")
    env["RAY_TMPDIR"] = ray_tmp
    log = open(tmp / "serve.err", "w+")  # noqa: SIM115 - read back in the tests
    proc = subprocess.Popen(
        [sys.executable, "-m", "raysearch.cli", "serve", "--ensemble", str(exp / "ensemble"),
         "--port", str(port), "--max-body-mb", "1", "--max-images", "3"],
        env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (tmp / "serve.err").read_text()
        time.sleep(1)
    else:
        pytest.fail("the server never became healthy:\n" + (tmp / "serve.err").read_text())
    yield {"url": url, "proc": proc, "ensemble": str(exp / "ensemble"), "log": tmp / "serve.err"}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _png(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _bomb(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height``: a decompression bomb's first bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + chunk(b"IEND", b"")


def test_a_study_gets_the_predictors_answer(server, tiny_root):
    paths = read_mura(tiny_root).query("split == 'test'")["image_path"].head(2).tolist()
    files = [("image", (f"v{i}.png", _png(p), "image/png")) for i, p in enumerate(paths)]
    r = httpx.post(f"{server['url']}/v1/predict", files=files, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = Predictor.from_dir(server["ensemble"], device="cpu").predict(paths)
    got = np.array([img["probs"]["abnormal"] for img in body["images"]])
    np.testing.assert_allclose(got, expected.probs[:, 0], atol=1e-5)
    assert body["study"]["abnormal"] == pytest.approx(float(expected.probs.mean()), abs=1e-5)
    assert body["decision"]["abnormal"] == (body["study"]["abnormal"] > body["threshold"])
    assert set(body["images"][0]["members"]) == {"a", "b"} and body["labels"] == ["abnormal"]


def test_model_and_health(server):
    model = httpx.get(f"{server['url']}/v1/model", timeout=10).json()
    assert [m["trial_id"] for m in model["members"]] == ["a", "b"]
    assert model["task"]["labels"] == ["abnormal"] and model["threshold"] == 0.5
    assert httpx.get(f"{server['url']}/healthz", timeout=10).json()["status"] == "ok"
    # Serve's own INFO lines stay off the terminal (stderr here) unless -v. The command prints
    # its "serving" line after its own /healthz check, which may come after the fixture's: wait.
    import time

    deadline = time.monotonic() + 60
    while "serving " not in server["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert " INFO " not in server["log"].read_text() and "serving " in server["log"].read_text()
    r = httpx.get(f"{server['url']}/v2/predict", timeout=10)  # Serve's own errors: JSON too
    assert r.status_code == 404 and "no endpoint /v2/predict" in r.json()["error"]


@pytest.mark.parametrize(
    ("files", "status", "message"),
    [
        ([("image", ("x.png", b"not an image at all", "image/png"))], 422,
         "image 'x.png': cannot decode image x.png: not a PNG, JPEG or DICOM image"),
        ([("image", ("notes.txt", b"hello", "text/plain"))], 415,
         "image 'notes.txt' has content type 'text/plain'"),
        ([("image", ("big.png", _bomb(8_000, 8_000), "image/png"))], 413,
         "image 'big.png' has 64,000,000 pixels, over the limit of 50,000,000"),
        ([("image", ("bomb.png", _bomb(20_000, 20_000), "image/png"))], 413,
         "image 'bomb.png' is a decompression bomb: Image size (400000000 pixels)"),
        ([("image", (f"{i}.png", b"x", "image/png")) for i in range(4)], 413,
         "4 images in one study, over the limit of 3"),
        ([("image", ("big.png", b"\0" * (2 * 2**20), "image/png"))], 413,
         "over the limit of 1,048,576"),
    ],
    ids=["not-an-image", "content-type", "pixels", "pixel-bomb", "too-many", "too-big"],
)
def test_bad_requests_get_a_4xx_json_error(server, files, status, message):
    r = httpx.post(f"{server['url']}/v1/predict", files=files, timeout=60)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_no_paths_or_urls_are_taken_from_a_request(server):
    for body in ({"path": "/etc/passwd"}, {"url": "http://169.254.169.254/"}):
        r = httpx.post(f"{server['url']}/v1/predict", json=body, timeout=30)
        assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]


def test_one_bad_image_does_not_fail_a_concurrent_good_study(server, tiny_root):
    import concurrent.futures

    path = read_mura(tiny_root)["image_path"].iloc[0]
    good = [("image", ("g.png", _png(path), "image/png"))]
    bad = [("image", ("b.png", b"garbage", "image/png"))]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(
            lambda f: httpx.post(f"{server['url']}/v1/predict", files=f, timeout=60).status_code,
            [good, bad] * 4))
    assert answers == [200, 422] * 4


def test_sighup_reloads_and_sigint_stops(server):
    proc = server["proc"]  # signals go to the server alone, as `kill -HUP <pid>` sends them
    os.kill(proc.pid, signal.SIGHUP)
    deadline = time.time() + 120
    while time.time() < deadline and "reloaded" not in server["log"].read_text():
        time.sleep(1)
    assert "(version 1)" in server["log"].read_text(), server["log"].read_text()
    assert "dashboard" not in server["log"].read_text()
    assert httpx.get(f"{server['url']}/healthz", timeout=10).status_code == 200
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 0
    assert "stopped" in server["log"].read_text()
