"""Image decoding for user data: bytes or files -> square RGB images, with bad input reported.

Shape legend: none (PIL images only).
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image

from sparsefusion.data.issues import BadInput
from sparsefusion.data.limits import InputLimits, read_regular_file

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif")


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) greyscale scaled to 8 bits ("L"); other modes unchanged.

    Pillow's ``convert("RGB")`` clips such values at 255 (a 16-bit PNG turns white) instead of
    scaling them.
    """
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return image
    values = np.asarray(image).astype(np.int64)
    # 16-bit PNGs open as "I;16" or "I" holding 0..65535; anything wider is scaled by its maximum.
    top = 65535 if values.max(initial=0) <= 65535 and values.min(initial=0) >= 0 else None
    if top is None:
        values = values - values.min(initial=0)
        top = max(1, int(values.max(initial=0)))
    return Image.fromarray(((values * 255 + top // 2) // top).astype(np.uint8), mode="L")


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to ``size`` x ``size`` RGB."""
    image = to_8bit(image).convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), Image.BICUBIC) if side != size else image


def decode_image_bytes(
    data: bytes, where: str, size: int, max_pixels: int = InputLimits.max_image_pixels
) -> Image.Image:
    """Decode an image fully (so truncation is detected here, not later) and square-resize it.

    The pixel count is read from the header and checked before any pixel is decoded.

    Raises:
        BadInput: ``oversize_image`` above ``max_pixels`` (or Pillow's decompression-bomb
            limit), ``corrupt_image`` for anything Pillow cannot decode completely.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise BadInput(
                        "oversize_image",
                        where,
                        f"{w}x{h} pixels > data.max_image_pixels={max_pixels}",
                    )
                im.load()
                return square_resize(im, size)
    except BadInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInput("oversize_image", where, f"image too large ({e})") from e
    except Exception as e:  # noqa: BLE001 - whatever a decoder of untrusted bytes raises
        raise BadInput("corrupt_image", where, f"cannot decode image ({e})") from e


def read_image(
    path: str | os.PathLike[str], where: str, size: int, limits: InputLimits | None = None
) -> Image.Image:
    """Read and decode an image file (a regular file within ``limits``), see
    :func:`~sparsefusion.data.limits.read_regular_file` for the reasons it raises."""
    limits = limits or InputLimits()
    data = read_regular_file(path, where, limits.max_file_bytes)
    return decode_image_bytes(data, where, size, limits.max_image_pixels)
