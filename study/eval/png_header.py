"""A PNG's size and pixel type from its header (the IHDR chunk, the first 33 bytes), without decoding it.

Used where a check needs only the size or the type of a PNG (a 16-bit panoptic PNG named as such; sizes of
label maps) so that no PNG is decoded twice: the engine decodes each one once.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR colour types (PNG specification, section 11.2.2).
_COLOUR = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale with alpha", 6: "RGBA"}


class PNGHeader(NamedTuple):
    width: int
    height: int
    bit_depth: int
    colour: str


def read_png_header(path: Path) -> PNGHeader:
    """The IHDR fields of a PNG file; ValueError when the file is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or head[:8] != _SIGNATURE or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    return PNGHeader(width, height, depth, _COLOUR.get(colour, f"colour type {colour}"))


def describe_png(path: Path) -> str:
    """'a 16-bit grayscale PNG (640x427)', or why it cannot be read."""
    try:
        h = read_png_header(path)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except ValueError:
        return "not a PNG file"
    return f"a {h.bit_depth}-bit {h.colour} PNG ({h.width}x{h.height})"
