"""The one image decoder: bytes or files -> RGB images, with one set of limits for every reader.

Datasets (``jsonl``, ``wds``), ``generate --image``, prompt files and ``serve`` uploads all decode
through :func:`decode_image`, so an image means the same thing everywhere:

- only the formats in :data:`~sparsefusion.data.limits.IMAGE_FORMATS` are opened (no ICO, whose
  frames may hold a PNG larger than the header says, nor the exotic plugins);
- the pixel count is read from the header and checked against ``max_image_pixels`` before any
  pixel is decoded (and again after decoding, in case a plugin grew the image);
- the image is decoded fully, so truncation is detected here rather than later;
- modes are converted by :func:`to_rgb`: 16- and 32-bit integer greyscale is scaled to 8 bits
  (not clipped, which turns it white), float images are scaled from ``[0, 1]`` (or their own
  range; not truncated, which turns them black), everything else goes through Pillow's RGB
  conversion.

Shape legend: none (PIL images only).
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image

from sparsefusion.data.issues import BadInput
from sparsefusion.data.limits import IMAGE_FORMATS, InputLimits, read_regular_file

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _scaled(values: np.ndarray, low: float, high: float) -> Image.Image:
    """``values`` (float32) mapped from ``[low, high]`` to 8-bit greyscale."""
    values = (values - np.float32(low)) * np.float32(255.0 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def to_8bit(image: Image.Image) -> Image.Image:
    """Integer and float greyscale (``I``, ``I;16*``, ``F``) scaled to 8 bits (``L``); other
    modes unchanged.

    Pillow's ``convert("RGB")`` clips such values at 255 (a 16-bit PNG turns white) or truncates
    them (a float TIFF in ``[0, 1]`` turns black) instead of scaling them. Integers within
    ``[0, 65535]`` (16-bit files) are scaled from that range, floats within ``[0, 1]`` from that
    one (NaN and infinities read as 0); anything else from ``min(0, lowest)`` to
    ``max(0, highest)``. The work is in float32 (4 bytes a pixel).
    """
    if image.mode not in (*_INT_MODES, "F"):
        return image
    values = np.asarray(image).astype(np.float32)
    if image.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        return _scaled(values, 0.0, 1.0)
    if image.mode != "F" and low >= 0 and high <= 65535:
        return _scaled(values, 0.0, 65535.0)
    return _scaled(values, low, high)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded mode as 8-bit RGB (see :func:`to_8bit` for the wide greyscale modes)."""
    image = to_8bit(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns when converting such a palette to RGB
    if image.mode == "La":
        image = image.convert("LA")
    return image.convert("RGB")


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to ``size`` x ``size`` RGB."""
    image = to_rgb(image)
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), Image.BICUBIC) if side != size else image


def _too_large(w: int, h: int, where: str, max_pixels: int) -> BadInput:
    return BadInput("oversize_image", where, f"{w}x{h} pixels > data.max_image_pixels={max_pixels}")


def decode_image(data: bytes, where: str, limits: InputLimits | None = None) -> Image.Image:
    """Decode untrusted image bytes completely, as RGB at their own size.

    Args:
        data: the file's bytes.
        where: the place named in errors (``docs.jsonl:3``, ``upload``).
        limits: ``max_image_pixels`` (checked from the header before decoding) and
            ``max_file_bytes``.

    Raises:
        BadInput: ``oversize_file`` above ``max_file_bytes``; ``oversize_image`` above
            ``max_image_pixels`` (or Pillow's decompression-bomb limit); ``corrupt_image`` for a
            format outside ``IMAGE_FORMATS`` or anything Pillow cannot decode completely.
    """
    limits = limits or InputLimits()
    if len(data) > limits.max_file_bytes:
        detail = f"{len(data)} bytes > data.max_file_bytes={limits.max_file_bytes}"
        raise BadInput("oversize_file", where, detail)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on damaged metadata
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                w, h = im.size
                if w * h > limits.max_image_pixels or w < 1 or h < 1:
                    raise _too_large(w, h, where, limits.max_image_pixels)
                im.load()
                if im.size[0] * im.size[1] > limits.max_image_pixels:
                    raise _too_large(*im.size, where, limits.max_image_pixels)
                return to_rgb(im)
    except BadInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInput("oversize_image", where, f"image too large ({e})") from e
    except Image.UnidentifiedImageError as e:
        accepted = ", ".join(IMAGE_FORMATS)
        raise BadInput(
            "corrupt_image", where, f"cannot decode image: not one of {accepted} ({e})"
        ) from e
    except Exception as e:  # noqa: BLE001 - whatever a decoder of untrusted bytes raises
        raise BadInput("corrupt_image", where, f"cannot decode image ({e})") from e


def decode_image_bytes(
    data: bytes, where: str, size: int, limits: InputLimits | None = None
) -> Image.Image:
    """:func:`decode_image`, then :func:`square_resize` to ``size``."""
    return square_resize(decode_image(data, where, limits), size)


def read_image(
    path: str | os.PathLike[str], where: str, size: int | None, limits: InputLimits | None = None
) -> Image.Image:
    """Read and decode an image file (a regular file within ``limits``), square-resized to
    ``size`` (None: at its own size); see
    :func:`~sparsefusion.data.limits.read_regular_file` for the reasons it raises."""
    limits = limits or InputLimits()
    data = read_regular_file(path, where, limits.max_file_bytes)
    image = decode_image(data, where, limits)
    return image if size is None else square_resize(image, size)
