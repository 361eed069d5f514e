"""Audio clips: WAV reading and writing with the standard-library ``wave`` module, resampling.

A speech segment's payload is a 1-D float32 tensor in [-1, 1] at ``SAMPLE_RATE`` Hz (mono).
Readers raise :class:`~sparsefusion.data.issues.BadInput` for missing, corrupt, truncated or
oversize files (checked from the header before decoding).

Shape legend: S = samples.
"""

from __future__ import annotations

import os
import wave

import numpy as np
import torch
import torch.nn.functional as F

from sparsefusion.data.issues import BadInput
from sparsefusion.data.limits import (
    MAX_SAMPLE_RATE,
    MIN_AUDIO_SECONDS,
    MIN_SAMPLE_RATE,
    InputLimits,
    read_regular_file,
)

SAMPLE_RATE = 16000


def resample(wave_S: torch.Tensor, rate: int, target: int = SAMPLE_RATE) -> torch.Tensor:
    """Linear-interpolation resampling (fine for 25 Hz speech units; no anti-alias filter)."""
    if rate == target or wave_S.numel() == 0:
        return wave_S
    n = max(1, round(wave_S.numel() * target / rate))
    return F.interpolate(wave_S[None, None], size=n, mode="linear", align_corners=False)[0, 0]


def decode_wav_bytes(
    data: bytes, where: str, max_seconds: float = InputLimits.max_audio_seconds
) -> torch.Tensor:
    """WAV bytes -> mono float32 waveform at ``SAMPLE_RATE``.

    The sample rate and the duration are checked from the header before any sample is decoded.

    Raises:
        BadInput: ``corrupt_audio`` for an unreadable, truncated, empty or non-PCM file, an
            implausible sample rate or a clip under ``MIN_AUDIO_SECONDS``; ``oversize_audio``
            above ``max_seconds``.
    """
    import io

    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            frames = w.getnframes()
            if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
                raise BadInput(
                    "corrupt_audio",
                    where,
                    f"sample rate {rate} Hz outside [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}]",
                )
            # The header's frame count may lie; the data actually present bounds it too.
            seconds = min(frames, len(data) // max(1, channels * width)) / rate
            if frames and seconds < MIN_AUDIO_SECONDS:
                raise BadInput(
                    "corrupt_audio", where, f"clip of {seconds:.3f} s < {MIN_AUDIO_SECONDS} s"
                )
            if seconds > max_seconds:
                raise BadInput(
                    "oversize_audio",
                    where,
                    f"{seconds:.1f} s > data.max_audio_seconds={max_seconds:g}",
                )
            raw = w.readframes(frames)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a decoder of untrusted bytes raises
        raise BadInput("corrupt_audio", where, f"not a readable WAV file ({e})") from e
    if width not in (1, 2, 4) or channels < 1:
        raise BadInput("corrupt_audio", where, f"unsupported WAV sample width {width}")
    if frames == 0 or len(raw) < frames * channels * width:
        raise BadInput("corrupt_audio", where, "truncated or empty WAV data")
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    x = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    if width == 1:
        x = (x - 128.0) / 128.0
    else:
        x = x / float(2 ** (8 * width - 1))
    x = x.reshape(-1, channels).mean(axis=1)
    return resample(torch.from_numpy(x.copy()), rate)


def read_wav(
    path: str | os.PathLike[str], where: str | None = None, limits: InputLimits | None = None
) -> torch.Tensor:
    """Read a WAV file (a regular file within ``limits``; see :func:`decode_wav_bytes` and
    :func:`~sparsefusion.data.limits.read_regular_file` for the reasons it raises)."""
    where = where or str(path)
    limits = limits or InputLimits()
    data = read_regular_file(path, where, limits.max_file_bytes)
    return decode_wav_bytes(data, where, limits.max_audio_seconds)


def write_wav(path: str | os.PathLike[str], wave_S: torch.Tensor, rate: int = SAMPLE_RATE) -> None:
    """Write a mono 16-bit PCM WAV (values clipped to [-1, 1])."""
    pcm = (wave_S.detach().float().clamp(-1, 1) * 32767).round().to(torch.int16).numpy()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
