"""Image decoding for user data: bytes or files -> square RGB images, with bad input reported.

Shape legend: none (PIL images only).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image

from sparsefusion.data.issues import BadInput

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif")


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to ``size`` x ``size`` RGB."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), Image.BICUBIC) if side != size else image


def decode_image_bytes(data: bytes, where: str, size: int) -> Image.Image:
    """Decode an image fully (so truncation is detected here, not later) and square-resize it.

    Raises:
        BadInput: ``corrupt_image`` for anything Pillow cannot decode completely.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return square_resize(im, size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise BadInput("corrupt_image", where, f"cannot decode image ({e})") from e


def read_image(path: str | os.PathLike[str], where: str, size: int) -> Image.Image:
    """Read and decode an image file; ``missing_file`` when it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadInput("missing_file", where, f"cannot read {path} ({e.strerror})") from e
    return decode_image_bytes(data, where, size)
