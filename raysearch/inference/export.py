"""Inference stage, export: an ensemble's members as TorchScript or ONNX files, with what it takes
to use them elsewhere (preprocessing, labels, weights) in one JSON manifest.

Each member becomes one file whose graph holds everything after decoding: it takes the
preprocessed image as :func:`raysearch.data.images.preprocess_image` returns it, a uint8 batch
``[B, 1, S, S]`` (grey, letterboxed to the member's image size S), scales it to 0..1, normalises
it with the ImageNet mean and std (the grey channel broadcast to 3), runs the network and returns
sigmoid probabilities ``[B, K]``, exactly as :class:`raysearch.inference.Predictor` does on a CPU
(float32). Decoding and letterboxing stay outside the graph: they are image I/O, described in
the manifest, and done in Python by ``preprocess_image``.

Layout of the output folder::

    export.json               the manifest (below), written last
    <trial_id>.pt             TorchScript (torch.jit.trace), or
    <trial_id>.onnx           ONNX (torch.onnx.export, opset 18, dynamic batch)

Both go through torch's TorchScript tracer (``torch.jit.trace``; ``torch.onnx.export`` with
``dynamo=False``). torch marks that path deprecated in favour of ``torch.export``, but on this
2-core machine its ONNX export took 7 s per member where the ``torch.export``-based one took 43 s,
it needs no ``onnxscript``, and both gave the same probabilities (within 2e-7); raysearch pins
torch <= 2.14, which has it. torch's deprecation warnings are kept out of the output.

``export.json``: ``format``, ``raysearch`` (version), ``task`` (name, labels, group, aggregation),
``threshold``, ``ensemble`` (how to combine: the weighted mean of member probabilities),
``preprocess`` (decode, letterbox, input name/dtype/shape, scale, mean, std, channels, and
``in_graph`` listing the steps the files do themselves), ``output`` (name, activation, labels),
``members`` (trial_id, file, sha256, weight, arch, image_size).

:class:`ExportedEnsemble` reads such a folder back and predicts with onnxruntime or
``torch.jit.load``, with no raysearch model code: the round trip the tests check.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from raysearch.data.augment import IMAGENET_MEAN, IMAGENET_STD
from raysearch.errors import ConfigError
from raysearch.storage import (
    atomic_write_bytes,
    atomic_write_text,
    exists,
    get_fs,
    join,
    read_bytes,
)

__all__ = ["FORMATS", "ExportedEnsemble", "export_ensemble"]

FORMATS = ("torchscript", "onnx")
MANIFEST = "export.json"
ONNX_OPSET = 18
_SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}


class _WithPreprocessing(torch.nn.Module):
    """uint8 ``[B, 1, S, S]`` -> probabilities ``[B, K]``: the predictor's CPU path in one graph."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32) / 255.0
        x = (x - self.mean) / self.std
        return torch.sigmoid(self.model(x).float())


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"--format: unknown value {fmt!r}; allowed: {', '.join(FORMATS)}")
    if fmt == "onnx" and _missing("onnx"):
        raise ConfigError("--format onnx needs the onnx package (pip install 'raysearch[export]')")


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def export_ensemble(
    ensemble: str,
    *,
    format: str,
    out: str | None = None,
) -> str:
    """Write every member of ``ensemble`` (an ensemble folder, or an experiment: its ensemble, else
    its best trial) as a ``format`` file (``torchscript`` or ``onnx``) under ``out`` (default
    ``<ensemble>/export-<format>``), then ``export.json``. Returns ``out``. Files an earlier
    export into ``out`` listed and this one does not (another ensemble's members, the other
    format's files) are removed after the new manifest is written, so the folder holds what its
    manifest says; nothing else in ``out`` is touched.

    Raises :class:`ConfigError` for an unknown format, or ONNX without ``onnx`` installed, and what :meth:`Predictor.from_dir` raises for a folder that is neither.
    """
    from raysearch import __version__
    from raysearch.inference.predictor import Predictor

    _check_format(format)
    predictor = Predictor.from_dir(ensemble, device="cpu")
    out = (out or join(ensemble.rstrip("/"), f"export-{format}")).rstrip("/")
    task = predictor.task
    members = []
    for m in predictor.members:
        size = int(m.config.image_size)
        wrapped = _WithPreprocessing(predictor.model(m)).eval()
        example = torch.zeros(2, 1, size, size, dtype=torch.uint8)
        name = f"{m.trial_id}{_SUFFIX[format]}"
        raw = _to_torchscript(wrapped, example) if format == "torchscript" else \
            _to_onnx(wrapped, example)
        atomic_write_bytes(join(out, name), raw)
        members.append({
            "trial_id": m.trial_id, "file": name, "sha256": hashlib.sha256(raw).hexdigest(),
            "weight": predictor.weights[m.trial_id], "arch": m.config.arch, "image_size": size,
        })
        predictor.unload(m.trial_id)
    manifest = {
        "format": format,
        "raysearch": __version__,
        "source": ensemble,
        "task": task.to_dict(),
        "threshold": predictor.threshold,
        "ensemble": "weighted mean of the members' probabilities (weights sum to 1); a study "
                    f"is the {task.aggregation} of its images",
        "preprocess": {
            "decode": "grey (ITU-R 601 luma, alpha dropped); 16-bit and float images stretched "
                      "from their own min..max to 0..255; DICOM through its modality LUT, VOI "
                      "LUT/window and MONOCHROME1 inversion",
            "letterbox": "zero-pad to a centred square, then resize to image_size x image_size "
                         "(bilinear, antialiased)",
            "python": "raysearch.data.images.preprocess_image(data, image_size=S)",
            "input": {"name": "image", "dtype": "uint8", "shape": ["batch", 1, "S", "S"]},
            "scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "channels": 3,
            "in_graph": ["scale", "normalise (grey broadcast to 3 channels)", "sigmoid"],
        },
        "output": {"name": "probs", "activation": "sigmoid", "labels": list(task.labels),
                   "shape": ["batch", task.k]},
        "members": members,
    }
    stale = _previous_files(out) - {m["file"] for m in members}
    atomic_write_text(join(out, MANIFEST), json.dumps(manifest, indent=1))
    for name in sorted(stale):  # an earlier export's members, named by its manifest only
        path = join(out, name)
        if exists(path):
            fs, local = get_fs(path)
            fs.rm(local)
    return out


def _previous_files(out: str) -> set[str]:
    """The member files an earlier export into ``out`` listed in its manifest (none when there
    is none, or it is unreadable): the files a new export there leaves stale. Only plain names
    inside ``out`` are returned, so a damaged manifest cannot point the removal elsewhere."""
    try:
        old = json.loads(read_bytes(join(out, MANIFEST)))
        names = {str(m["file"]) for m in old["members"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {n for n in names if n and "/" not in n and "\\" not in n and n not in (".", "..")
            and n != MANIFEST}


@contextlib.contextmanager
def _quiet_torch():
    """torch's deprecation warnings for the tracer, kept out of a user's terminal."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _to_torchscript(module: torch.nn.Module, example: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    with _quiet_torch(), torch.no_grad():
        torch.jit.save(torch.jit.trace(module, example, check_trace=False), buf)
    return buf.getvalue()


def _to_onnx(module: torch.nn.Module, example: torch.Tensor) -> bytes:
    import onnx

    buf = io.BytesIO()
    with _quiet_torch(), torch.no_grad():
        torch.onnx.export(
            module, (example,), buf, input_names=["image"], output_names=["probs"],
            opset_version=ONNX_OPSET, dynamo=False,
            dynamic_axes={"image": {0: "batch"}, "probs": {0: "batch"}},
        )
    raw = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(raw))
    return raw


def _read_manifest(folder: str) -> dict[str, Any]:
    """``folder``'s ``export.json``, checked to be one :func:`export_ensemble` writes (a known
    ``format``; ``members`` each with ``trial_id``, ``file``, ``sha256``, ``weight`` and
    ``image_size``; ``output.labels``). Raises :class:`ConfigError` naming the path otherwise."""
    path = join(folder, MANIFEST)
    try:
        raw = read_bytes(path)
    except FileNotFoundError:
        raise ConfigError(f"not an export folder: {folder} (no {MANIFEST}; `raysearch export "
                          f"--ensemble DIR --format torchscript|onnx --out {folder}` writes "
                          f"one)") from None
    except (IsADirectoryError, NotADirectoryError):
        raise ConfigError(f"not an export folder: {folder}") from None
    try:
        manifest = json.loads(raw)
        if manifest["format"] not in FORMATS:
            raise ValueError(f"format {manifest['format']!r} is not one of {', '.join(FORMATS)}")
        labels = manifest["output"]["labels"]
        members = manifest["members"]
        if not members or not labels:
            raise ValueError("no members" if not members else "no labels")
        for m in members:
            for key in ("trial_id", "file", "sha256", "weight", "image_size"):
                if key not in m:
                    raise KeyError(key)
    except (ValueError, KeyError, TypeError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise ConfigError(f"{path} is not a manifest `raysearch export` writes ({what})") from None
    return manifest


class ExportedEnsemble:
    """An export folder read back: ``predict(images)`` gives ``(ensemble [N, K], {trial_id:
    [N, K]})`` with onnxruntime (ONNX) or ``torch.jit.load`` (TorchScript), the members combined
    by the manifest's weights. Each file's SHA-256 is checked against the manifest.

    Raises :class:`ConfigError` naming the path when ``folder`` holds no ``export.json`` (an
    ensemble or experiment folder given by mistake, a mistyped path), when the manifest is not
    one ``raysearch export`` writes, or when a member file it lists is missing or changed."""

    def __init__(self, folder: str) -> None:
        self.folder = str(folder).rstrip("/")
        self.manifest: dict[str, Any] = _read_manifest(self.folder)
        self.format = self.manifest["format"]
        self._run = {}
        for m in self.manifest["members"]:
            path = join(self.folder, m["file"])
            try:
                raw = read_bytes(path)
            except FileNotFoundError:
                raise ConfigError(f"{path} is missing (a member listed in "
                                  f"{join(self.folder, MANIFEST)})") from None
            if hashlib.sha256(raw).hexdigest() != m["sha256"]:
                raise ConfigError(f"{join(self.folder, m['file'])} does not match its sha256 in "
                                  f"{MANIFEST}")
            self._run[m["trial_id"]] = self._runner(raw)

    def _runner(self, raw: bytes):
        if self.format == "onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
            return lambda x: session.run(["probs"], {"image": x})[0]
        with _quiet_torch():
            module = torch.jit.load(io.BytesIO(raw), map_location="cpu").eval()

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(x)).numpy()

        return run

    def predict(self, sources: Sequence[Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Probabilities for images (paths, URLs, bytes or arrays, as the predictor takes)."""
        from raysearch.data.images import preprocess_image

        members = {}
        for m in self.manifest["members"]:
            size = int(m["image_size"])
            if not len(sources):  # no images: [0, K], as many labels as the files answer
                k = len(self.manifest["output"]["labels"])
                members[m["trial_id"]] = np.zeros((0, k), dtype=np.float32)
                continue
            x = np.stack([preprocess_image(s, image_size=size) for s in sources])[:, None]
            members[m["trial_id"]] = np.asarray(self._run[m["trial_id"]](x), dtype=np.float32)
        probs = sum(float(m["weight"]) * members[m["trial_id"]].astype(np.float64)
                    for m in self.manifest["members"])
        return np.asarray(probs), members
