"""Validation of a generation request: every error names the field, before any model work.

A request arrives as a JSON object or as multipart form fields (strings) plus an optional image
upload; :func:`parse_params` turns either into :class:`GenerateParams` or raises
:class:`FieldError` with the HTTP status the API answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from PIL import Image

from sparsefusion.data.images import decode_image as decode_image_data
from sparsefusion.data.issues import BadInput
from sparsefusion.data.limits import InputLimits


class FieldError(ValueError):
    """A bad request field: the API answers ``status`` with ``{"error", "field"}``.

    Args:
        field: the request field at fault.
        message: what is wrong (the field name is prefixed).
        status: the HTTP status (404 unknown run/checkpoint, 413 too large, 415 not an image,
            422 otherwise).
    """

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        field = _printable(field, 100)  # a client's unknown key may hold anything
        super().__init__(f"{field}: {_printable(message, 2000)}")
        self.field = field
        self.status = status


def _printable(text: str, limit: int) -> str:
    """``text`` as valid UTF-8 (lone surrogates escaped), cut to ``limit`` characters."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class Limits:
    """What the server accepts (``sparsefusion serve`` options).

    Attributes:
        max_prompt_chars: longest prompt, in characters.
        max_upload_bytes: largest image upload.
        max_image_pixels: largest uploaded image (width x height, read from its header before
            decoding; the datasets' ``data.max_image_pixels`` default).
        max_body_bytes: largest JSON body (and form field), checked before it is parsed.
        max_json_depth: deepest nesting of a JSON body, checked before it is parsed.
        max_samples: most samples per request.
        max_new_tokens: most new tokens per sample.
        queue_size: requests that may wait per model besides a running batch (more: 503).
        max_batch: requests one model decodes together (those that arrive while a batch runs
            join the next one; 1 = one request at a time).
    """

    max_prompt_chars: int = 2000
    max_upload_bytes: int = 4 * 1024 * 1024
    max_image_pixels: int = InputLimits.max_image_pixels
    max_body_bytes: int = 256 * 1024
    max_json_depth: int = 16
    max_samples: int = 8
    max_new_tokens: int = 2048
    queue_size: int = 4
    max_batch: int = 16


MODES = (
    "text",
    "text_to_image",
    "image_to_text",
    "text_to_speech",
    "speech_to_text",
    "interleaved",
)

# field -> (type, default, low, high, low inclusive); bounds None = no bound.
_NUMBERS: dict[str, tuple[type, Any, float | None, float | None, bool]] = {
    "temperature": (float, 1.0, 0.0, 5.0, True),
    "top_p": (float, 1.0, 0.0, 1.0, False),
    "top_k": (int, 0, 0, 2**31 - 1, True),
    "repetition_penalty": (float, 1.0, 0.0, 10.0, False),
    "cfg_scale": (float, 1.0, 0.0, 20.0, False),
    "seed": (int, 0, 0, 2**31 - 1, True),
    "num_samples": (int, 1, 1, None, True),
    "max_new_tokens": (int, 256, 1, None, True),
}
_STRINGS = ("run", "checkpoint", "prompt", "mode")


@dataclass(frozen=True)
class GenerateParams:
    """A validated generation request (field meanings as in ``GenerationRequest``)."""

    run: str
    checkpoint: int | None
    prompt: str
    mode: str
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    cfg_scale: float
    seed: int
    num_samples: int
    max_new_tokens: int
    image: Image.Image | None = None


def parse_params(
    fields: dict[str, Any], limits: Limits, image: Image.Image | None = None
) -> GenerateParams:
    """Check the fields of a request and convert them.

    Args:
        fields: field -> value (JSON values, or strings from a form).
        limits: the server's limits.
        image: the decoded upload (see :func:`decode_image`), if any.

    Raises:
        FieldError: an unknown field, a missing ``run``, a bad type or a value out of range.
    """
    unknown = sorted(set(fields) - set(_NUMBERS) - set(_STRINGS) - {"image"})
    if unknown:
        raise FieldError(unknown[0], f"unknown field (known: {sorted([*_STRINGS, *_NUMBERS])})")
    values = {name: _number(name, fields.get(name), limits) for name in _NUMBERS}
    run = _string("run", fields.get("run"))
    if not run:
        raise FieldError("run", "required")
    prompt = _string("prompt", fields.get("prompt"))
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FieldError("prompt", f"not valid Unicode text ({e.reason} at {e.start})") from None
    if len(prompt) > limits.max_prompt_chars:
        raise FieldError(
            "prompt", f"{len(prompt)} characters, the limit is {limits.max_prompt_chars}"
        )
    mode = _string("mode", fields.get("mode")) or "text"
    if mode not in MODES:
        raise FieldError("mode", f"unknown mode {mode!r} (modes: {', '.join(MODES)})")
    if mode == "image_to_text" and image is None:
        raise FieldError("image", "mode image_to_text needs an image upload")
    return GenerateParams(
        run=run,
        checkpoint=parse_checkpoint(fields.get("checkpoint")),
        prompt=prompt,
        mode=mode,
        image=image,
        **values,
    )


def _string(name: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FieldError(name, f"must be a string, got {type(value).__name__}")
    return value


def parse_checkpoint(value: Any) -> int | None:
    """A checkpoint field: a step number, or None for the newest ("", "latest" or absent).

    Raises:
        FieldError: not a step number.
    """
    if value is None or value in ("", "latest"):
        return None
    try:
        step = _as_int(value)
    except (ValueError, TypeError, OverflowError):
        raise FieldError(
            "checkpoint", f"must be a step number or 'latest', got {value!r}"
        ) from None
    if step < 0:
        raise FieldError("checkpoint", f"must be >= 0, got {step}")
    return step


def _number(name: str, value: Any, limits: Limits) -> float | int:
    kind, default, low, high, low_inclusive = _NUMBERS[name]
    if name == "num_samples":
        high = limits.max_samples
    if name == "max_new_tokens":
        high = limits.max_new_tokens
    if value is None or value == "":
        return default
    try:
        number = _as_int(value) if kind is int else _as_float(value)
    except (ValueError, TypeError, OverflowError):
        kind_name = "an integer" if kind is int else "a number"
        raise FieldError(name, f"must be {kind_name}, got {value!r}") from None
    below = low is not None and (number < low if low_inclusive else number <= low)
    if below or (high is not None and number > high):
        left = "[" if low_inclusive else "("
        right = "inf)" if high is None else f"{high}]"
        raise FieldError(name, f"{number} is out of range {left}{low}, {right}")
    return number


def _as_int(value: Any) -> int:
    if not isinstance(value, int | str) or isinstance(value, bool):
        raise TypeError(value)
    return int(value)


def _as_float(value: Any) -> float:
    if not isinstance(value, int | float | str) or isinstance(value, bool):
        raise TypeError(value)
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    return number


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """Decode an uploaded image with the datasets' decoder (``data/images.py``): same formats,
    same mode conversion, pixel count checked from the header before decoding.

    Raises:
        FieldError: 413 when larger than ``limits.max_upload_bytes`` or
            ``limits.max_image_pixels``, 415 when not a readable image of an accepted format.
    """
    if len(data) > limits.max_upload_bytes:
        raise FieldError(
            "image", f"upload of {len(data)} bytes exceeds {limits.max_upload_bytes}", 413
        )
    bounds = InputLimits(
        max_file_bytes=limits.max_upload_bytes, max_image_pixels=limits.max_image_pixels
    )
    try:
        return decode_image_data(data, "upload", bounds)
    except BadInput as e:
        status = 413 if e.reason.startswith("oversize") else 415
        raise FieldError("image", e.detail, status) from None
