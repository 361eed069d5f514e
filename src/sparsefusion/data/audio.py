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


PCM = 1
EXTENSIBLE = 0xFFFE
_PCM_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")  # KSDATAFORMAT_SUBTYPE_PCM


def parse_wav_header(data: bytes, where: str) -> tuple[int, int, int, memoryview]:
    """The RIFF/WAVE chunks of ``data``: (channels, bytes per sample, rate, sample bytes).

    Accepts integer PCM of 8, 16, 24 or 32 bits, as ``WAVE_FORMAT_PCM`` or
    ``WAVE_FORMAT_EXTENSIBLE`` with the PCM sub-format.

    Raises:
        BadInput: ``corrupt_audio`` for anything else.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise BadInput("corrupt_audio", where, "not a RIFF/WAVE file")
    fmt, samples, pos = None, None, 12
    while pos + 8 <= len(data) and (fmt is None or samples is None):
        kind, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = memoryview(data)[pos + 8 : pos + 8 + size]
        if kind == b"fmt ":
            fmt = bytes(body)
        elif kind == b"data":
            if len(body) < size:
                raise BadInput("corrupt_audio", where, "truncated WAV data")
            samples = body
        pos += 8 + size + (size & 1)
    if fmt is None or len(fmt) < 16 or samples is None:
        raise BadInput("corrupt_audio", where, "no fmt or data chunk")
    tag = int.from_bytes(fmt[0:2], "little")
    channels = int.from_bytes(fmt[2:4], "little")
    rate = int.from_bytes(fmt[4:8], "little")
    bits = int.from_bytes(fmt[14:16], "little")
    if tag == EXTENSIBLE and len(fmt) >= 40 and fmt[26:40] == _PCM_GUID_TAIL:
        tag = int.from_bytes(fmt[24:26], "little")
    if tag != PCM:
        raise BadInput("corrupt_audio", where, f"WAV format {tag:#06x} is not integer PCM")
    if bits not in (8, 16, 24, 32) or channels < 1:
        raise BadInput("corrupt_audio", where, f"unsupported WAV: {bits} bits, {channels} channels")
    return channels, bits // 8, rate, samples


def _pcm_to_float(raw: memoryview, width: int) -> np.ndarray:
    if width == 1:
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 3:  # little-endian 24-bit: widen to int32 (low byte zero), same scale as 32-bit
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        wide = np.zeros((len(b), 4), dtype=np.uint8)
        wide[:, 1:] = b
        return wide.view("<i4")[:, 0].astype(np.float32) / float(2**31)
    dtype = {2: "<i2", 4: "<i4"}[width]
    return np.frombuffer(raw, dtype=dtype).astype(np.float32) / float(2 ** (8 * width - 1))


def decode_wav_bytes(
    data: bytes, where: str, max_seconds: float = InputLimits.max_audio_seconds
) -> torch.Tensor:
    """WAV bytes -> mono float32 waveform at ``SAMPLE_RATE``: the one WAV reader.

    Integer PCM of 8, 16, 24 or 32 bits (plain or ``WAVE_FORMAT_EXTENSIBLE``), any channel
    count (averaged). The sample rate and the duration are checked from the header before any
    sample is decoded.

    Raises:
        BadInput: ``corrupt_audio`` for an unreadable, truncated, empty or non-PCM file, an
            implausible sample rate or a clip under ``MIN_AUDIO_SECONDS``; ``oversize_audio``
            above ``max_seconds``.
    """
    channels, width, rate, samples = parse_wav_header(data, where)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise BadInput(
            "corrupt_audio",
            where,
            f"sample rate {rate} Hz outside [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}]",
        )
    frames = len(samples) // (channels * width)
    if frames == 0:
        raise BadInput("corrupt_audio", where, "truncated or empty WAV data")
    seconds = frames / rate
    if seconds < MIN_AUDIO_SECONDS:
        raise BadInput("corrupt_audio", where, f"clip of {seconds:.3f} s < {MIN_AUDIO_SECONDS} s")
    if seconds > max_seconds:
        raise BadInput(
            "oversize_audio", where, f"{seconds:.1f} s > data.max_audio_seconds={max_seconds:g}"
        )
    x = _pcm_to_float(samples[: frames * channels * width], width)
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
