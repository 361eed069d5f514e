"""Per-record limits for users' data, and a file reader that enforces them before decoding.

A hostile or broken record must cost bounded memory and time and become a counted skip
(:class:`~sparsefusion.data.issues.BadInput`), never a crash or a hang: only regular files are
read (not FIFOs, devices such as ``/dev/zero``, or folders), a path holding a NUL byte is refused,
and every size is checked before any decoding (file bytes, document bytes, image pixels from the
header, audio duration from the header).

Shape legend: none.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparsefusion.data.issues import BadInput

MB = 1 << 20
# The image formats any reader decodes (Pillow format names); others, ICO among them (its frames
# may hold a PNG larger than its header says), are refused before decoding.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
# JSON strings (escapes included), removed before brackets are counted.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


@dataclass(frozen=True)
class InputLimits:
    """Limits applied to every record before it is decoded (``data.*`` keys of the same name).

    Attributes:
        max_file_bytes: largest image or audio file (or shard member) read.
        max_doc_bytes: largest JSONL line (or caption) parsed, in bytes. The default, 256 KiB,
            is 16 bytes per token of the default ``data.max_doc_tokens`` (text averages about 4);
            raise both for longer documents (tokenizing costs about 160 MB of memory per MB).
        max_image_pixels: largest image (width x height, from its header) decoded.
        max_audio_seconds: longest audio clip (from its header) decoded.
    """

    max_file_bytes: int = 64 * MB
    max_doc_bytes: int = MB // 4
    max_image_pixels: int = 40_000_000
    max_audio_seconds: float = 600.0


# WAV sample rates outside this range are refused as corrupt (a header claiming 0 Hz or 300 MHz).
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 384_000
# Shorter clips are refused as corrupt: the speech tokenizer's STFT needs more than n_fft / 2
# samples (n_fft 1024 by default; 0.1 s at 16 kHz leaves room up to n_fft 3200).
MIN_AUDIO_SECONDS = 0.1


def read_regular_file(path: str | os.PathLike[str], where: str, max_bytes: int) -> bytes:
    """Read a regular file of at most ``max_bytes`` bytes, with bounded memory and no blocking.

    Raises:
        BadInput: ``missing_file`` (cannot be read), ``not_regular_file`` (a FIFO, device,
            folder or a path with a NUL byte) or ``oversize_file``.
    """
    name = os.fspath(path)
    if "\x00" in name:
        raise BadInput("not_regular_file", where, f"path {name!r} contains a NUL byte")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; regular files ignore the flag.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise BadInput("missing_file", where, f"cannot read {name} ({e.strerror})") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadInput("not_regular_file", where, f"{name} is not a regular file")
        if info.st_size > max_bytes:
            raise BadInput(
                "oversize_file",
                where,
                f"{name} has {info.st_size} bytes > data.max_file_bytes={max_bytes}",
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)  # the file may have grown since fstat
    except OSError as e:
        raise BadInput("missing_file", where, f"cannot read {name} ({e.strerror})") from e
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise BadInput("oversize_file", where, f"{name} is larger than data.max_file_bytes")
    return data


def json_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in a JSON text, counted without parsing it.

    Brackets inside strings are not counted; an unterminated string leaves its brackets counted,
    which can only overstate the depth of a text that does not parse anyway.
    """
    skeleton = np.frombuffer(_JSON_STRING.sub(b"", data), dtype=np.uint8)
    steps = np.isin(skeleton, (ord("["), ord("{"))).astype(np.int64)
    steps -= np.isin(skeleton, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def parse_json(data: bytes, where: str, max_bytes: int, max_depth: int) -> Any:
    """Parse untrusted JSON with its size and nesting checked first (bounded memory and stack).

    Raises:
        BadInput: ``oversize_document`` above ``max_bytes`` bytes or ``max_depth`` levels of
            nesting; ``bad_json`` for text that is not UTF-8 JSON.
    """
    if len(data) > max_bytes:
        raise BadInput("oversize_document", where, f"{len(data)} bytes > {max_bytes}")
    depth = json_depth(data)
    if depth > max_depth:
        raise BadInput("oversize_document", where, f"nested {depth} deep > {max_depth}")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise BadInput("bad_json", where, f"invalid JSON ({e})") from None
