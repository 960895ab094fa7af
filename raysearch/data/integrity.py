"""Data stage, image integrity: is an encoded PNG or JPEG complete, judged by its structure.

A file is complete when its end chunk (PNG ``IEND``) or end marker (JPEG ``EOI``) is found by
walking the file's own structure from the start: PNG chunks by their lengths (PNG spec, sec. 5.3,
https://www.w3.org/TR/png/#5Chunk-layout), JPEG segments by their lengths and the entropy-coded
data up to the next marker (ITU-T T.81, annex B). Bytes after the end (padding, common in
recovered files) do not matter: Pillow, and so :func:`raysearch.data.images.preprocess_image`,
stops reading there too. Judging by the last bytes alone would call such a file truncated.

:func:`image_problem` reads only the head and a short tail first; a file whose tail is not the
end marker (padded or truncated, both rare) is read whole and walked.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["PNG_SIGNATURE", "image_end", "image_problem"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the whole IEND chunk: length 0, type, CRC
_JPEG_EOI = b"\xff\xd9"
# JPEG markers that carry no length field: TEM, RST0..RST7, SOI, EOI (T.81, table B.1).
_STANDALONE = {0x01, *range(0xD0, 0xD8), 0xD8}


def image_end(data: bytes) -> int | None:
    """The offset just past the end chunk (PNG) or end marker (JPEG) of ``data``, or None when
    the structure runs out before it (a truncated file) or ``data`` is neither format.

    Bytes after the returned offset are padding that decoders ignore.
    """
    if data.startswith(PNG_SIGNATURE):
        return _png_end(data)
    if data.startswith(JPEG_SOI):
        return _jpeg_end(data)
    return None


def _png_end(data: bytes) -> int | None:
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(data):  # 4 length + 4 type + data + 4 CRC
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            return None
        if kind == b"IEND":  # length 0 and its fixed CRC, or the end itself is cut or broken
            return end if data[pos:end] == _PNG_IEND else None
        pos = end
    return None


def _jpeg_end(data: bytes) -> int | None:
    pos, n = 2, len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return None  # not at a marker: the structure is broken
        while pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos + 1 >= n:
            return None
        marker = data[pos + 1]
        pos += 2
        if marker == 0xD9:
            return pos
        if marker in _STANDALONE:
            continue
        if pos + 2 > n:
            return None
        pos += int.from_bytes(data[pos : pos + 2], "big")
        if pos > n:
            return None
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next real marker
            pos = _after_scan(data, pos)
            if pos is None:
                return None
    return None


def _after_scan(data: bytes, pos: int) -> int | None:
    """The offset of the first marker after entropy-coded data starting at ``pos``; inside the
    data 0xFF is stuffed as FF 00 and restart markers FF D0..D7 belong to the scan."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return None
        nxt = data[pos + 1]
        if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
            pos += 1 if nxt == 0xFF else 2
            continue
        return pos


def image_problem(read: Callable[[int, int], bytes], size: int, *, expect: str = "PNG or JPEG"
                  ) -> str | None:
    """Why the encoded image of ``size`` bytes is not complete, or None when it is.

    ``read(start, end)`` returns bytes ``[start, end)`` of the file (e.g. ``fs.cat_file`` with
    ``start``/``end``); it may raise OSError, which the caller reports. ``expect`` names the
    format(s) accepted, for the message: "PNG" accepts only PNG, anything else PNG and JPEG.
    Reasons: "not a readable <expect> (N bytes)", "not a <expect> (bad signature)",
    "truncated PNG (no IEND chunk)", "truncated JPEG (no EOI marker)".
    """
    if size < len(JPEG_SOI) + len(_JPEG_EOI):  # not even an empty JPEG
        return f"not a readable {expect} ({size} bytes)"
    head = read(0, len(PNG_SIGNATURE))
    if head.startswith(PNG_SIGNATURE):
        fmt, tail_marker = "PNG", _PNG_IEND
    elif head.startswith(JPEG_SOI) and expect != "PNG":
        fmt, tail_marker = "JPEG", _JPEG_EOI
    else:
        return f"not a {expect} (bad signature)"
    if read(size - len(tail_marker), size) == tail_marker:
        return None  # the common case: the file ends exactly at its end marker
    if image_end(read(0, size)) is None:  # padded or truncated: walk the structure
        return "truncated PNG (no IEND chunk)" if fmt == "PNG" else "truncated JPEG (no EOI marker)"
    return None
