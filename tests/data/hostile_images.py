"""Image files for the decoder tests: wide greyscale and float modes, an ICO holding a large PNG."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def grey16(fmt: str = "PNG") -> bytes:
    """An 8x8 16-bit greyscale image: left half 32768 (mid grey), right half 65535 (white)."""
    values = np.full((8, 8), 32768, dtype=np.uint16)
    values[:, 4:] = 65535
    return encoded(Image.fromarray(values), fmt)


def float_tiff() -> bytes:
    """An 8x8 float32 TIFF: left half 0.5, right half 1.0."""
    values = np.full((8, 8), 0.5, dtype=np.float32)
    values[:, 4:] = 1.0
    return encoded(Image.fromarray(values, mode="F"), "TIFF")


def ico_holding(png: bytes, claimed: int = 16) -> bytes:
    """An ICO whose one entry claims ``claimed`` x ``claimed`` but holds ``png`` (any size)."""
    entry = struct.pack("<BBBBHHII", claimed, claimed, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png
