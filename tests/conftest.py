"""Shared fixtures: one tokenizer cache for the whole session, GPU test skipping.

The test models are tiny, so every process (and every subprocess a test starts) uses one CPU
thread: faster than two here, and immune to oversubscription when several processes share cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory) -> str:
    """A tokenizer cache folder shared by every training test of the session."""
    return str(tmp_path_factory.mktemp("tokenizer_cache"))


def write_tone(path, freqs, seconds: float = 0.6, rate: int = 16000) -> None:
    """A WAV of consecutive sine tones (one per frequency), for speech fixtures."""
    import math

    from sparsefusion.data.audio import write_wav

    n = int(seconds * rate)
    t = torch.arange(n) / rate
    wave = torch.cat([0.5 * torch.sin(2 * math.pi * f * t) for f in freqs])
    write_wav(path, wave, rate)


@pytest.fixture()
def user_jsonl(tmp_path):
    """A JSONL dataset with images, audio and one bad line of every kind.

    Lines 1-7 are good (line 3 is blank and ignored); lines 8-14 are bad: a truncated PNG, a text
    file named .png, invalid JSON, a missing file, an empty document, an unknown segment type and
    a truncated WAV.
    """
    import json

    from PIL import Image

    (tmp_path / "img").mkdir()
    (tmp_path / "wav").mkdir()
    colours = ["red", "green", "blue", "yellow"]
    for c in colours:
        Image.new("RGB", (40, 30), c).save(tmp_path / "img" / f"{c}.png")
    write_tone(tmp_path / "wav" / "low.wav", [220, 330])
    write_tone(tmp_path / "wav" / "high.wav", [880, 1320, 660])
    good = (tmp_path / "img" / "red.png").read_bytes()
    (tmp_path / "img" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "img" / "fake.png").write_text("not an image")
    wav = (tmp_path / "wav" / "low.wav").read_bytes()
    (tmp_path / "wav" / "truncated.wav").write_bytes(wav[:30])
    lines = [
        [{"text": "A red square."}, {"image": "img/red.png"}],
        {"segments": [{"image": "img/green.png"}, {"text": "A green square."}], "id": "g"},
        None,
        [{"text": "A low tone."}, {"audio": "wav/low.wav"}],
        [
            {"audio": "wav/high.wav"},
            {"text": "A high tone, then a blue square."},
            {"image": "img/blue.png"},
        ],
        [{"text": "Only words here, about a yellow square and nothing else."}],
        [{"text": "A yellow square."}, {"image": "img/yellow.png"}],
        [{"text": "truncated"}, {"image": "img/truncated.png"}],
        [{"text": "fake"}, {"image": "img/fake.png"}],
        "{not json",
        [{"text": "missing"}, {"image": "img/nowhere.png"}],
        [],
        [{"video": "clip.mp4"}],
        [{"text": "cut"}, {"audio": "wav/truncated.wav"}],
    ]
    text = "\n".join("" if x is None else x if isinstance(x, str) else json.dumps(x) for x in lines)
    path = tmp_path / "docs.jsonl"
    path.write_text(text + "\n")
    return path
