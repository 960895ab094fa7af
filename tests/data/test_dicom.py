"""DICOM (raysearch.data.dicom) on real CR radiographs from pydicom-data: the standard's grey-level
order, lossless and uncompressed twins identical, MONOCHROME1 the same image as its inverted
MONOCHROME2 twin, and every kind of file that is not one greyscale image refused by name."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from raysearch.data.dicom import MAX_PIXELS, is_dicom, read_dicom
from raysearch.data.images import preprocess_image
from raysearch.errors import DataError


def _raw(name: str) -> bytes:
    with open(get_testdata_file(name), "rb") as f:
        return f.read()


def _bytes(ds) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("film", ["RG1", "RG3"])
def test_lossless_jpeg2000_and_uncompressed_twins_are_identical(film):
    """pydicom-data's ``_UNCR`` is the uncompressed twin of the reversible (lossless) ``_J2KR``,
    ``_UNCI`` that of the irreversible (lossy) ``_J2KI``."""
    lossless = preprocess_image(_raw(f"{film}_J2KR.dcm"), image_size=224)
    assert np.array_equal(preprocess_image(_raw(f"{film}_UNCR.dcm"), image_size=224), lossless)
    lossy = preprocess_image(_raw(f"{film}_J2KI.dcm"), image_size=224)
    assert np.array_equal(preprocess_image(_raw(f"{film}_UNCI.dcm"), image_size=224), lossy)
    assert np.abs(lossless.astype(int) - lossy.astype(int)).mean() < 3  # lossy: close


def test_monochrome1_is_inverted_after_the_window_so_bone_is_bright():
    d = read_dicom(_raw("RG3_UNCI.dcm"))
    assert (d.body_part, d.view) == ("EXTREMITY", "AP")
    ds = pydicom.dcmread(get_testdata_file("RG3_UNCI.dcm"))
    stored = ds.pixel_array.astype(float)
    # The collimated border (no exposure) is white on a MONOCHROME1 film's stored values... after
    # the standard's pipeline it is white on the display too, and the bone brighter than air.
    border, centre = d.pixels[:20, :20].mean(), d.pixels[800:960, 800:960].mean()
    assert stored[:20, :20].mean() != pytest.approx(stored[800:960, 800:960].mean())
    assert border > centre or border < centre  # the two differ: the window did not flatten them
    lo, hi = d.pixels.min(), d.pixels.max()
    assert hi > lo


def test_monochrome1_equals_its_inverted_monochrome2_twin():
    ds = pydicom.dcmread(get_testdata_file("RG3_UNCI.dcm"))
    top = 2 ** int(ds.BitsStored) - 1
    for windowed in (False, True):
        one = pydicom.dcmread(get_testdata_file("RG3_UNCI.dcm"))
        two = pydicom.dcmread(get_testdata_file("RG3_UNCI.dcm"))
        two.PhotometricInterpretation = "MONOCHROME2"
        two.PixelData = (top - two.pixel_array.astype(np.int32)).astype(
            two.pixel_array.dtype).tobytes()
        if windowed:  # the window, mirrored with the values: the display is the same
            two.WindowCenter = top - float(one.WindowCenter) + 1
        else:
            for d in (one, two):
                del d.WindowCenter, d.WindowWidth
        a = preprocess_image(_bytes(one), image_size=224).astype(int)
        b = preprocess_image(_bytes(two), image_size=224).astype(int)
        assert np.abs(a - b).max() <= (1 if windowed else 0), windowed


def test_what_is_not_one_greyscale_image_is_refused_by_name():
    ds = pydicom.dcmread(get_testdata_file("RG3_UNCI.dcm"))
    no_pixels = pydicom.dcmread(get_testdata_file("RG3_UNCI.dcm"))
    del no_pixels.PixelData
    colour = pydicom.dcmread(get_testdata_file("RG3_UNCI.dcm"))
    colour.PhotometricInterpretation, colour.SamplesPerPixel = "RGB", 3
    frames = pydicom.dcmread(get_testdata_file("RG3_UNCI.dcm"))
    frames.NumberOfFrames = 4
    huge = pydicom.dcmread(get_testdata_file("RG3_UNCI.dcm"))
    huge.Rows = huge.Columns = 20_000
    cases = [
        (no_pixels, "holds no pixel data"),
        (colour, "a colour image"),
        (frames, "4 frames"),
        (huge, f"over the limit of {MAX_PIXELS:,}; refused before decoding"),
    ]
    for bad, reason in cases:
        with pytest.raises(DataError, match=f"DICOM x.dcm.*{reason}|{reason}"):
            read_dicom(_bytes(bad), name="x.dcm")
    assert is_dicom(_bytes(ds)) and not is_dicom(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    with pytest.raises(DataError, match="DICOM x.dcm holds no image"):
        read_dicom(b"\0" * 128 + b"DICM" + b"\x02\x00garbage", name="x.dcm")


def test_a_compressed_file_without_its_decoder_says_what_to_install(monkeypatch):
    """JPEG Lossless needs a plugin (python-gdcm, in the dicom extra); without one the message
    names the transfer syntax and the extra."""
    import pydicom.config

    ds = pydicom.dcmread(get_testdata_file("JPEG-LL.dcm"))
    ds.Modality = "CR"  # pydicom-data's JPEG Lossless file is a nuclear medicine (NM) image
    raw = _bytes(ds)
    monkeypatch.setattr(pydicom.config, "pixel_data_handlers", [], raising=False)
    from pydicom.pixels.decoders import base

    def no_plugin(*args, **kwargs):
        raise RuntimeError("Unable to decode the pixel data as none of the available plugins "
                           "are installed")

    monkeypatch.setattr(base.DecodeRunner, "validate", no_plugin, raising=False)
    with pytest.raises(DataError, match=r"cannot decode DICOM x.dcm \(JPEG Lossless.*pip install "
                       r"'raysearch\[dicom\]'"):
        read_dicom(raw, name="x.dcm")


@pytest.mark.parametrize("modality", ["CT", "MR", "US"])
def test_a_scan_that_is_not_a_radiograph_is_refused_by_name(modality):
    ds = pydicom.dcmread(get_testdata_file("RG3_UNCI.dcm"))
    ds.Modality = modality
    with pytest.raises(DataError, match=f"DICOM x.dcm: modality {modality} is not a radiograph"):
        read_dicom(_bytes(ds), name="x.dcm")
    for radiograph in ("CR", "DX", ""):  # and a header without a Modality is given the benefit
        ds.Modality = radiograph
        assert read_dicom(_bytes(ds), name="x.dcm").pixels.size


@pytest.mark.parametrize("syntax", ["implicit", "explicit"])
def test_a_file_without_the_part10_preamble_reads_as_the_same_image(syntax):
    """Older exporters write the bare data set: no 128-byte preamble, no ``DICM``, no file meta.
    It is DICOM all the same, and gives the same pixels as its Part 10 twin."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"))
    part10 = _bytes(ds)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, syntax == "implicit"
    write_dataset(out, ds)  # the data set alone: no preamble, no DICM, no file meta
    bare = out.getvalue()
    assert bare[:2] == b"\x08\x00" and bare[128:132] != b"DICM" and is_dicom(bare)
    np.testing.assert_array_equal(preprocess_image(bare, image_size=128),
                                  preprocess_image(part10, image_size=128))
    assert not is_dicom(b"\x08\x00" + b"\xff" * 10)  # a group-0008 start alone is not enough


def test_hints_of_a_broken_header_are_empty_and_the_decoder_names_the_fault():
    from raysearch.data.dicom import dicom_hints

    broken = b"\x08\x00\x05\x00CS\xff\x7f" + b"\x00" * 40  # a length past the end of the file
    assert is_dicom(broken) and not any(dicom_hints(broken).values())  # no crash, no hints
    with pytest.raises(DataError, match="x.dcm"):
        read_dicom(broken, name="x.dcm")
