"""The one WAV reader accepts any integer-PCM WAV (8/16/24/32 bits, plain or
WAVE_FORMAT_EXTENSIBLE) and refuses the rest with corrupt_audio."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from sparsefusion.data.audio import decode_wav_bytes
from sparsefusion.data.issues import BadInput

PCM_GUID = struct.pack("<H", 1) + bytes.fromhex("000000001000800000aa00389b71")


def wav_bytes(x: np.ndarray, bits: int, *, extensible: bool = False, channels: int = 1,
              rate: int = 16000, tag: int = 1) -> bytes:  # fmt: skip
    """``x`` in [-1, 1] as a PCM WAV of ``bits`` bits (each channel a copy)."""
    x = np.repeat(x[:, None], channels, axis=1).reshape(-1)
    if bits == 8:
        raw = np.round(x * 127 + 128).astype(np.uint8).tobytes()
    elif bits == 24:
        v = np.round(x * (2**23 - 1)).astype("<i4")
        raw = v.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        raw = np.round(x * (2 ** (bits - 1) - 1)).astype(f"<i{bits // 8}").tobytes()
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * align,
                      align, bits)  # fmt: skip
    if extensible:
        fmt += struct.pack("<HHI", 22, bits, 0) + PCM_GUID
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(raw)) + raw
    return b"RIFF" + struct.pack("<I", len(body)) + body


SIGNAL = (0.5 * np.sin(np.linspace(0, 200, 8000))).astype(np.float32)


@pytest.mark.parametrize("bits", [8, 16, 24, 32])
@pytest.mark.parametrize("extensible", [False, True])
def test_every_integer_pcm_wav_decodes_to_the_same_wave(bits, extensible):
    got = decode_wav_bytes(wav_bytes(SIGNAL, bits, extensible=extensible, channels=2), "x.wav")
    tol = 1 / 100 if bits == 8 else 1e-4
    assert torch.allclose(got, torch.from_numpy(SIGNAL), atol=tol)


@pytest.mark.parametrize(
    "data, match",
    [
        (wav_bytes(SIGNAL, 16, tag=3), "not integer PCM"),  # IEEE float tag with int data
        (wav_bytes(SIGNAL, 16)[:-100], "truncated"),
        (wav_bytes(SIGNAL, 16)[:40], "no fmt or data chunk|truncated"),
        (b"RIFX" + b"\0" * 40, "not a RIFF/WAVE file"),
        (wav_bytes(SIGNAL, 12 + 8), "unsupported WAV: 20 bits"),
    ],
)
def test_other_wavs_are_corrupt_audio(data, match):
    with pytest.raises(BadInput, match=match) as e:
        decode_wav_bytes(data, "x.wav")
    assert e.value.reason == "corrupt_audio"
