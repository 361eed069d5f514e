"""The one image decoder (data/images.py): formats, modes and limits, the same for every reader.

``read_image`` is what datasets and ``generate --image`` use; ``serve`` uploads go through the
same ``decode_image`` (tests/serve/test_serve_hostile.py).
"""

from __future__ import annotations

import json

import pytest
from hostile import bomb_png
from hostile_images import encoded, float_tiff, grey16, ico_holding
from PIL import Image

from sparsefusion.data.images import decode_image, read_image
from sparsefusion.data.issues import BadInput
from sparsefusion.data.limits import InputLimits, json_depth, parse_json


def _read(tmp_path, name: str, data: bytes, size: int | None = 8, **limits) -> Image.Image:
    (tmp_path / name).write_bytes(data)
    return read_image(tmp_path / name, name, size, InputLimits(**limits))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path, fmt):
    image = _read(tmp_path, f"g.{fmt.lower()}", grey16(fmt))
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == (128, 128, 128)
    assert image.getpixel((6, 6)) == (255, 255, 255)


def test_float_tiff_is_scaled_not_black(tmp_path):
    image = _read(tmp_path, "f.tiff", float_tiff())
    assert image.getpixel((1, 1)) == (128, 128, 128)
    assert image.getpixel((6, 6)) == (255, 255, 255)


def test_ico_is_refused_before_its_frame_is_decoded(tmp_path):
    # Pillow decodes an ICO's PNG frame while opening it, before its size can be checked.
    with pytest.raises(BadInput, match="not one of PNG") as e:
        _read(tmp_path, "i.ico", ico_holding(bomb_png(4000)), max_image_pixels=1_000_000)
    assert e.value.reason == "corrupt_image"


def test_pixel_limit_is_read_from_the_header(tmp_path):
    with pytest.raises(BadInput, match="4000x4000 pixels > data.max_image_pixels") as e:
        _read(tmp_path, "b.png", bomb_png(4000), max_image_pixels=1_000_000)
    assert e.value.reason == "oversize_image"


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "PA", "RGBA", "CMYK", "I", "F", "I;16"])
def test_every_mode_becomes_rgb_at_its_own_size(mode):
    fmt = "TIFF" if mode in ("CMYK", "I", "F", "I;16", "PA") else "PNG"
    image = decode_image(encoded(Image.new(mode, (5, 3)), fmt), "x")
    assert image.mode == "RGB" and image.size == (5, 3)


def test_truncated_and_foreign_bytes_are_corrupt(tmp_path):
    png = encoded(Image.new("RGB", (64, 64), "red"), "PNG")
    for data in (png[: len(png) // 2], b"GIF89a" + bytes(20), b"not an image"):
        with pytest.raises(BadInput) as e:
            decode_image(data, "x")
        assert e.value.reason == "corrupt_image"


def test_json_is_checked_for_size_and_depth_before_parsing():
    assert json_depth(b'{"a": "[[[[", "b": [[1]]}') == 3
    assert json_depth(b'"\\"[[["') == 0
    assert parse_json(b'{"a": [1]}', "body", 100, 2) == {"a": [1]}
    with pytest.raises(BadInput, match="nested 100000 deep > 64"):
        parse_json(b"[" * 100_000 + b"]" * 100_000, "body", 1 << 20, 64)
    with pytest.raises(BadInput, match="bytes > 10"):
        parse_json(json.dumps({"p": "x" * 20}).encode(), "body", 10, 64)
    for bad in (b"{", b"\xff\xfe", b'{"a": NaN'):
        with pytest.raises(BadInput) as e:
            parse_json(bad, "body", 100, 8)
        assert e.value.reason == "bad_json"
