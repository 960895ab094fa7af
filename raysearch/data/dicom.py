"""Data stage, DICOM: a radiograph's pixels turned into the grey levels a person would see, the
way the standard says, before the same 8-bit preprocessing every image gets.

pydicom reads the file (python-gdcm, in the ``dicom`` extra, decodes JPEG Lossless, JPEG-LS and
JPEG 2000; no GPL plugin is used). The grey-level pipeline follows DICOM PS3.3 C.11 and C.7.6.3,
in this order:

1. the Modality LUT (Rescale Slope and Intercept, or a Modality LUT Sequence);
2. the VOI LUT (a VOI LUT Sequence, preferred) or else the Window Center / Width;
3. *then* the inversion of MONOCHROME1 (or of a Presentation LUT Shape ``INVERSE``), so that
   bone is bright; inverting before the VOI step would invert twice.

The header is read first (``stop_before_pixels``) and a file is refused before any decoding when
it is not one greyscale radiograph: another modality (CT, MR, ...: see
:data:`RADIOGRAPH_MODALITIES`), multi-frame, colour, no pixel data, a declared size over
:data:`MAX_PIXELS`, or the deflated transfer syntax (a zip-bomb vector). Files without the
Part 10 preamble (a bare data set) are read too. ``BodyPartExamined``,
``ViewPosition`` and ``ImageLaterality`` are returned as hints, never used as truth.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from raysearch.errors import DataError, first_line

__all__ = ["MAX_PIXELS", "RADIOGRAPH_MODALITIES", "DicomImage", "dicom_hints", "is_dicom",
           "read_dicom"]

MAX_PIXELS = 100_000_000  # 10k x 10k: larger than any radiograph; a bomb is refused, not decoded
_DEFLATED = "1.2.840.10008.1.2.1.99"
_INSTALL = "pip install 'raysearch[dicom]' (python-gdcm decodes JPEG Lossless, JPEG-LS and JPEG 2000)"


# Projection radiography modalities (DICOM PS3.3 C.7.3.1.1.1, Modality defined terms): computed
# and digital radiography, radiographic imaging, intra-oral, panoramic, mammography, digital
# X-ray. CT, MR, US, NM, PT and the rest are not radiographs: a radiograph model's answer on
# them means nothing, so they are refused (skipped, with the reason) rather than scored.
RADIOGRAPH_MODALITIES = ("CR", "DX", "RG", "IO", "PX", "MG", "DR", "XA", "RF")


def is_dicom(raw: bytes) -> bool:
    """A DICOM file: Part 10 (128 bytes of preamble, then ``DICM``), or a bare data set without
    the preamble, as older exporters write, told by its first tag: group 0002 (file meta) or
    0008 (identifying), little endian (PS3.5 sec. 7)."""
    return _has_preamble(raw) or _bare_dataset(raw)


def _has_preamble(raw: bytes) -> bool:
    """Part 10: 128 bytes of preamble, then ``DICM`` (PS3.10 sec. 7.1)."""
    return len(raw) >= 132 and raw[128:132] == b"DICM"


def _bare_dataset(raw: bytes) -> bool:
    if len(raw) < 8 or raw[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    element = int.from_bytes(raw[2:4], "little")
    vr = raw[4:6]
    explicit = vr.isalpha() and vr.isupper()
    implicit_length = int.from_bytes(raw[4:8], "little")
    return element < 0x0100 and (explicit or implicit_length < 1 << 16)


@dataclass(frozen=True)
class DicomImage:
    """The grey levels of one radiograph, float64 ``[H, W]``, bone bright, and the header's hints
    (``body_part``, ``view``, ``laterality``; None when absent)."""

    pixels: np.ndarray
    body_part: str | None
    view: str | None
    laterality: str | None


def read_dicom(raw: bytes, *, name: str = "<bytes>") -> DicomImage:
    """Decode a DICOM file's pixels through the modality LUT, the VOI LUT or window, then the
    MONOCHROME1 inversion (see the module docstring). Raises :class:`DataError` naming the file
    and the reason for anything that is not one decodable greyscale image, and says what to
    install when a compressed transfer syntax has no decoder."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise DataError(f"{name} is a DICOM file and pydicom is not installed: {_INSTALL}") from None
    bare = not _has_preamble(raw)  # a bare data set: pydicom reads it only with force
    try:
        header = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True, force=bare)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on a broken header
        raise DataError(f"cannot read DICOM {name}: {first_line(e)[:200]}") from None
    _check_header(header, name=name)
    try:
        ds = pydicom.dcmread(io.BytesIO(raw), force=bare)
        if bare and "TransferSyntaxUID" not in ds.file_meta:  # PS3.5 A.1: the default syntax
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read DICOM {name}: {first_line(e)[:200]}") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(f"DICOM {name} holds no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - decoder plugins raise many types
        text = first_line(e)[:200]
        if "plugin" in text.lower() or "decod" in text.lower() or "handler" in text.lower():
            raise DataError(
                f"cannot decode DICOM {name} ({ds.file_meta.TransferSyntaxUID.name}): {text}; "
                f"{_INSTALL}"
            ) from None
        raise DataError(f"cannot decode DICOM {name}: {text}") from None
    if arr.ndim != 2:
        raise DataError(f"DICOM {name}: expected one greyscale frame, got pixel shape {arr.shape}")
    grey = apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        grey = apply_voi_lut(grey, ds, prefer_lut=True).astype(np.float64)
    inverse = ds.get("PhotometricInterpretation") == "MONOCHROME1" or \
        str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    if inverse:
        grey = grey.max() + grey.min() - grey
    return DicomImage(
        pixels=grey,
        body_part=_hint(header, "BodyPartExamined"),
        view=_hint(header, "ViewPosition"),
        laterality=_hint(header, "ImageLaterality") or _hint(header, "Laterality"),
    )


def dicom_hints(raw: bytes) -> dict[str, str | None]:
    """The header's hints (``body_part``, ``view``, ``laterality``) and the study it belongs to
    (``study_uid``: Study Instance UID), from the header alone; none when the header cannot be
    read (:func:`read_dicom` then says why)."""
    import pydicom

    bare = not _has_preamble(raw)
    try:
        ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True, force=bare)
    except Exception:  # noqa: BLE001 - a broken header: read_dicom names the fault, not hints
        return {}
    return {"body_part": _hint(ds, "BodyPartExamined"), "view": _hint(ds, "ViewPosition"),
            "laterality": _hint(ds, "ImageLaterality") or _hint(ds, "Laterality"),
            "study_uid": _hint(ds, "StudyInstanceUID")}


def _check_header(ds, *, name: str) -> None:
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        raise DataError(f"DICOM {name}: modality {modality} is not a radiograph (expected one of "
                        f"{', '.join(RADIOGRAPH_MODALITIES)}); radiograph models do not read it")
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "")) if meta is not None else ""
    if syntax == _DEFLATED:
        raise DataError(f"DICOM {name}: the deflated transfer syntax is refused (a zip-bomb vector)")
    if "Rows" not in ds or "Columns" not in ds:
        raise DataError(f"DICOM {name} holds no image (no Rows/Columns: not an image object)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DataError(f"DICOM {name}: {frames} frames; raysearch reads single-frame radiographs")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"DICOM {name}: a colour image ({photometric}, {samples} samples per "
                        "pixel); radiographs are MONOCHROME1 or MONOCHROME2")
    pixels = int(ds.Rows) * int(ds.Columns) * frames
    if pixels > MAX_PIXELS:
        raise DataError(f"DICOM {name}: declares {ds.Rows} x {ds.Columns} pixels, over the limit "
                        f"of {MAX_PIXELS:,}; refused before decoding")


def _hint(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None
