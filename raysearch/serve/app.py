"""Serve stage: a trained ensemble behind HTTP, as a Ray Serve application.

Endpoints (JSON in and out; every error is a 4xx with ``{"error": "..."}`` saying what was wrong):

- ``POST /v1/predict``: one study as multipart images (PNG, JPEG or DICOM). Returns the study
  probability per label, the decision at the ensemble's threshold, the probabilities per image
  and per member, the model id and the threshold.
- ``GET /v1/model``: the members, their weights, the task, the training data and the val/test
  metrics of the ensemble folder it serves.
- ``GET /healthz``.

Every image is read, checked and decoded in the request's own handler, before it can join a
batch, so one bad image fails its own request only (an exception inside a ``@serve.batch`` call
fails every request of the batch). Requests are then batched across clients (``@serve.batch``);
``max_ongoing_requests`` is raised to fit a whole batch (its default of 5 would cap batches at 5).

Limits, each refused with a 4xx before the work it would cost: the request body size (413, and
411 without a Content-Length), images per study (413), pixels per image (413: read from the
header, so a decompression bomb is never decoded), content types (415). Paths and URLs are never
taken from a request: only the uploaded bytes are read.

Hot swap: the ensemble is the deployment's ``user_config`` (``{"ensemble": DIR}``); deploying
the same app with another one makes Serve call :meth:`EnsembleServer.reconfigure` on the running
replicas, which load the new ensemble and switch to it without a restart
(``raysearch serve`` does this on SIGHUP).
"""

# No ``from __future__ import annotations`` here: Serve wraps the handlers, and FastAPI then
# resolves string annotations in Serve's module, where ``Request`` is unknown.
import asyncio
import io
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from starlette.requests import Request

__all__ = ["Limits", "build_app"]

CONTENT_TYPES = ("image/png", "image/jpeg", "application/dicom", "application/octet-stream")


@dataclass(frozen=True)
class Limits:
    """What one request may hold: body bytes, images, pixels per image."""

    max_body_bytes: int = 64 * 2**20
    max_images: int = 16
    max_pixels: int = 50_000_000

    def __post_init__(self) -> None:
        from raysearch.errors import ConfigError

        for name, flag in (("max_body_bytes", "--max-body-mb"), ("max_images", "--max-images"),
                           ("max_pixels", "--max-pixels")):
            if not getattr(self, name) >= 1:
                raise ConfigError(f"{flag} must be > 0, got {getattr(self, name)}")


class RequestError(Exception):
    """A request refused with ``status`` and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _check_pixels(raw: bytes, *, name: str, limits: Limits) -> None:
    """Refuse an image whose header declares more pixels than allowed, before decoding it."""
    from raysearch.data.dicom import is_dicom

    if is_dicom(raw):
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
            pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
        except Exception:  # noqa: BLE001 - the decoder says what is wrong, below
            return
    else:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(raw)) as img:  # reads the header only
                pixels = img.width * img.height
        except Image.DecompressionBombError as e:  # over twice PIL's own limit: refused at open
            raise RequestError(413, f"image {name!r} is a decompression bomb: {e}") from None
        except Exception:  # noqa: BLE001 - not an image: the decoder says so, below
            return
    if pixels > limits.max_pixels:
        raise RequestError(413, f"image {name!r} has {pixels:,} pixels, over the limit of "
                                f"{limits.max_pixels:,}")


def json_errors(api) -> None:
    """Make every error ``api`` answers by itself (an unknown path, a wrong method, a malformed
    request) the same JSON shape as the app's own: ``{"error": "..."}`` with its 4xx status,
    instead of FastAPI's ``{"detail": ...}``."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def http_error(request, exc: HTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"no endpoint {request.url.path}; the endpoints are {', '.join(ENDPOINTS)}"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse({"error": detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def invalid(request, exc: RequestValidationError):
        return JSONResponse({"error": f"invalid request: {exc.errors()}"}, status_code=422)

    api.add_exception_handler(HTTPException, http_error)
    api.add_exception_handler(RequestValidationError, invalid)


def allow_pixels(max_pixels: int) -> None:
    """Let Pillow open images up to ``max_pixels`` (the server's own limit, checked from the
    header first): Pillow's built-in bomb guard (about 89 M pixels, an error at twice that)
    would otherwise refuse images that ``--max-pixels`` allows. Never lowers Pillow's limit and
    never turns it off."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)


ENDPOINTS = ("POST /v1/predict", "GET /v1/model", "GET /healthz")


def build_app(ensemble: str, *, limits: Limits | None = None, max_batch_size: int = 8,
              batch_wait_timeout_s: float = 0.02, replicas: int = 1, gpus: float = 0.0,
              version: int = 0):
    """The Serve application of the ensemble (or experiment) folder ``ensemble``. ``version``
    goes into the ``user_config`` with it: a new version of the same folder reloads it."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from ray import serve

    limits = limits or Limits()
    api = FastAPI(title="raysearch", docs_url=None, redoc_url=None, openapi_url=None)
    json_errors(api)

    @serve.deployment(
        num_replicas=replicas,
        max_ongoing_requests=max(2 * max_batch_size, 8),
        ray_actor_options={"num_gpus": gpus, "num_cpus": 0.5 if not gpus else 1},
        health_check_period_s=10,
    )
    @serve.ingress(api)
    class EnsembleServer:
        def __init__(self, source: str) -> None:
            self.config: dict[str, Any] = {"ensemble": source, "version": 0}
            allow_pixels(limits.max_pixels)
            self._load(source)
            self.batched.set_max_batch_size(max_batch_size)
            self.batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

        # --- the model, and its hot swap
        def _load(self, source: str) -> None:
            from raysearch.inference.predictor import Predictor

            predictor = Predictor.from_dir(source)
            for m in predictor.members:
                predictor.model(m)  # load now: a broken ensemble fails the swap, not a request
            self.source, self.predictor = source, predictor
            self.info = _model_info(source, predictor)

        def reconfigure(self, config: dict[str, Any]) -> None:
            # Serve calls this after __init__ and whenever the user_config changes: a new
            # ensemble folder, or the same one again with a new "version" (it was rewritten).
            if config.get("ensemble") and config != self.config:
                self._load(config["ensemble"])
                self.config = dict(config)

        def check_health(self) -> None:
            if not self.predictor.members:
                raise RuntimeError("no ensemble loaded")

        # --- endpoints
        @api.get("/healthz")
        async def healthz(self):
            return {"status": "ok", "model": self.info["model_id"]}

        @api.get("/v1/model")
        async def model(self):
            return self.info

        @api.post("/v1/predict")
        async def predict(self, request: Request):
            started = time.perf_counter()
            try:
                names, arrays = await self._read_study(request)
            except RequestError as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            predictor, info = self.predictor, self.info  # one model for the whole request
            probs, members = await self.batched((predictor, arrays))
            return _answer(predictor, info, names, probs, members,
                           seconds=time.perf_counter() - started)

        # --- reading and checking a request, before it may join a batch
        async def _read_study(self, request):
            length = request.headers.get("content-length")
            if length is None:
                raise RequestError(411, "a Content-Length header is required")
            if int(length) > limits.max_body_bytes:
                raise RequestError(413, f"the request body has {int(length):,} bytes, over the "
                                        f"limit of {limits.max_body_bytes:,}")
            if not request.headers.get("content-type", "").startswith("multipart/form-data"):
                raise RequestError(415, "send the study's images as multipart/form-data")
            try:
                form = await request.form(max_files=limits.max_images + 1,
                                          max_part_size=limits.max_body_bytes)
            except Exception as e:  # noqa: BLE001 - a malformed body
                raise RequestError(400, f"cannot parse the multipart body: {e}") from None
            files = [v for _, v in form.multi_items() if hasattr(v, "read")]
            if not files:
                raise RequestError(400, "the request holds no image files")
            if len(files) > limits.max_images:
                raise RequestError(413, f"{len(files)} images in one study, over the limit of "
                                        f"{limits.max_images}")
            names, raws = [], []
            for f in files:
                name = f.filename or f"image{len(names) + 1}"
                kind = (f.content_type or "application/octet-stream").split(";")[0].strip()
                if kind not in CONTENT_TYPES:
                    raise RequestError(415, f"image {name!r} has content type {kind!r}; allowed: "
                                            f"{', '.join(CONTENT_TYPES)}")
                raw = await f.read()
                _check_pixels(raw, name=name, limits=limits)
                names.append(name)
                raws.append(raw)
            return names, await asyncio.get_running_loop().run_in_executor(
                None, _decode, self.predictor, names, raws)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
        async def batched(self, studies: list[tuple[Any, dict[int, np.ndarray]]]):
            # One forward pass per member over every image of every study in the batch (studies
            # decoded for an ensemble swapped out meanwhile run on the one they were decoded for).
            out: list = [None] * len(studies)
            groups: dict[int, list[int]] = {}
            for i, (predictor, _) in enumerate(studies):
                groups.setdefault(id(predictor), []).append(i)
            for idx in groups.values():
                predictor = studies[idx[0]][0]
                sizes = list(studies[idx[0]][1])
                stacked = {z: np.concatenate([studies[i][1][z] for i in idx]) for z in sizes}
                pred = predictor.predict_preprocessed(stacked)
                start = 0
                for i in idx:
                    n = len(studies[i][1][sizes[0]])
                    part = slice(start, start + n)
                    out[i] = (pred.probs[part], {t: p[part] for t, p in pred.members.items()})
                    start += n
            return out

    config = {"ensemble": ensemble, "version": version}
    return EnsembleServer.options(user_config=config).bind(ensemble)


def _decode(predictor, names: list[str], raws: list[bytes]) -> dict[int, np.ndarray]:
    """Every image at every member size, or RequestError(422) naming the first bad image."""
    from raysearch.data.images import preprocess_image_sizes
    from raysearch.errors import DataError

    sizes = sorted({m.config.image_size for m in predictor.members})
    out: dict[int, list] = {s: [] for s in sizes}
    for name, raw in zip(names, raws):
        try:
            decoded = preprocess_image_sizes(raw, image_sizes=sizes)
            for s in sizes:
                out[s].append(decoded[s])
        except DataError as e:
            raise RequestError(422, f"image {name!r}: {str(e).replace('<bytes>', name)}") from None
    return {s: np.stack(v) for s, v in out.items()}


def _answer(predictor, info, names, probs, members, *, seconds: float) -> dict[str, Any]:
    from raysearch.evaluation import metrics as M

    task = predictor.task
    study = getattr(np, task.aggregation)(probs, axis=0)
    return {
        "model_id": info["model_id"],
        "threshold": _thresholds(predictor),
        "labels": list(task.labels),
        "aggregation": task.aggregation,
        "study": {label: float(study[j]) for j, label in enumerate(task.labels)},
        "decision": {label: bool(M.predict([study[j]], threshold=predictor.thresholds[j])[0])
                     for j, label in enumerate(task.labels)},
        "images": [
            {"name": name, "probs": {label: float(probs[i, j]) for j, label in enumerate(task.labels)},
             "members": {t: [float(x) for x in p[i]] for t, p in members.items()}}
            for i, name in enumerate(names)
        ],
        "seconds": round(seconds, 4),
    }


def _thresholds(predictor) -> float | dict[str, float]:
    """The decision threshold (one label) or the thresholds per label."""
    if predictor.task.k == 1:
        return predictor.threshold
    return {lb: float(t) for lb, t in zip(predictor.task.labels, predictor.thresholds)}


def _model_info(source: str, predictor) -> dict[str, Any]:
    """What ``GET /v1/model`` says: members, weights, the task, data and metrics when the folder
    has them (an ensemble's ``ensemble.json`` and ``category_metrics.parquet``)."""
    import hashlib

    from raysearch.storage import exists, join, read_bytes, read_parquet

    members = [
        {"trial_id": m.trial_id, "weight": predictor.weights[m.trial_id], "arch": m.config.arch,
         "image_size": m.config.image_size}
        for m in predictor.members
    ]
    model_id = hashlib.sha256(json.dumps(
        [(m["trial_id"], round(m["weight"], 6), m2.checkpoint) for m, m2 in
         zip(members, predictor.members)], sort_keys=True).encode()).hexdigest()[:12]
    info: dict[str, Any] = {"model_id": model_id, "source": source.rstrip("/").rsplit("/", 1)[-1],
                            "task": asdict(predictor.task), "threshold": _thresholds(predictor),
                            "members": members}
    folder = source if exists(join(source, "members.parquet")) else join(source, "ensemble")
    if exists(join(folder, "ensemble.json")):
        summary = json.loads(read_bytes(join(folder, "ensemble.json")))
        info["ensemble"] = {k: summary.get(k) for k in ("method", "top", "tta", "n_test_studies")}
    if exists(join(folder, "category_metrics.parquet")):
        metrics = read_parquet(join(folder, "category_metrics.parquet"))
        rows = metrics[(metrics["model"] == "ensemble")]
        info["metrics"] = json.loads(rows.drop(columns=["model"]).to_json(orient="records"))
    return info
