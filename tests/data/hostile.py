"""Hostile records for tests: decompression bombs, deep JSON, odd paths, lying WAV headers."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def bomb_png(side: int) -> bytes:
    """A valid 1-bit greyscale PNG of ``side`` x ``side`` zeros (tiny file, huge image)."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def wav_with_rate(rate: int, num_bytes: int = 3000) -> bytes:
    """A 16-bit mono PCM WAV whose header claims ``rate`` Hz, with ``num_bytes`` of samples."""
    data = b"\x00" * num_bytes
    fmt = struct.pack("<HHIIHH", 1, 1, rate, (rate * 2) & 0xFFFFFFFF, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data"
    body += struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def plant(folder: Path) -> list[tuple[str, str]]:
    """Write the hostile files into ``folder`` and return (JSONL line, expected reason) pairs."""
    (folder / "bomb.png").write_bytes(bomb_png(30000))
    (folder / "big.png").write_bytes(bomb_png(8000))  # 64 M pixels: over the default limit
    (folder / "rate0.wav").write_bytes(wav_with_rate(0))
    (folder / "rate300m.wav").write_bytes(wav_with_rate(300_000_000))
    (folder / "rate1.wav").write_bytes(wav_with_rate(1))
    (folder / "short.wav").write_bytes(wav_with_rate(16000, num_bytes=200))  # 6 ms
    os.mkfifo(folder / "fifo.wav")
    deep = "[" * 100_000 + "]" * 100_000
    return [
        (json.dumps([{"text": "bomb"}, {"image": "bomb.png"}]), "oversize_image"),
        (json.dumps([{"text": "big"}, {"image": "big.png"}]), "oversize_image"),
        (deep, "bad_json"),
        ("[" + "1" * 5000 + "]", "bad_json"),  # an integer Python refuses to convert
        (json.dumps([{"text": "nul"}, {"image": "img/a\u0000b.png"}]), "not_regular_file"),
        (json.dumps([{"text": "zero"}, {"image": "/dev/zero"}]), "not_regular_file"),
        (json.dumps([{"text": "fifo"}, {"audio": "fifo.wav"}]), "not_regular_file"),
        (json.dumps([{"text": "folder"}, {"image": "."}]), "not_regular_file"),
        (json.dumps([{"text": "0 Hz"}, {"audio": "rate0.wav"}]), "corrupt_audio"),
        (json.dumps([{"text": "300 MHz"}, {"audio": "rate300m.wav"}]), "corrupt_audio"),
        (json.dumps([{"text": "1 Hz"}, {"audio": "rate1.wav"}]), "corrupt_audio"),
        (json.dumps([{"text": "6 ms"}, {"audio": "short.wav"}]), "corrupt_audio"),
    ]
