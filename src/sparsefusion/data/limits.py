"""Per-record limits for users' data, and a file reader that enforces them before decoding.

A hostile or broken record must cost bounded memory and time and become a counted skip
(:class:`~sparsefusion.data.issues.BadInput`), never a crash or a hang: only regular files are
read (not FIFOs, devices such as ``/dev/zero``, or folders), a path holding a NUL byte is refused,
and every size is checked before any decoding (file bytes, document bytes, image pixels from the
header, audio duration from the header).

Shape legend: none.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from sparsefusion.data.issues import BadInput

MB = 1 << 20


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
