"""Speech synthesised offline with espeak-ng from the scene corpus's English (Debian ``espeak-ng``).

Document ``index`` is a pure function of (seed, split, index): a private RNG picks a kind, the
sentences (scene captions or short passages, see ``scene_text.py``) and a voice (speed, pitch).
Kinds, after SpiRit-LM's mix: ``text_speech`` (a transcript, then its speech), ``speech_text``
(speech, then its transcript), ``speech_only``, and ``interleaved`` (sentences alternating between
text and speech). Synthesis takes about 10 ms per sentence; clips are cached in memory.

Install: ``apt-get install espeak-ng``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import subprocess
import tempfile

import torch

from sparsefusion.data import scene_text as st
from sparsefusion.data.audio import read_wav
from sparsefusion.data.documents import SPEECH, TEXT, Document, Segment
from sparsefusion.data.optional import need_program
from sparsefusion.data.scene_draw import random_scene

KIND_WEIGHTS = {"text_speech": 0.3, "speech_text": 0.3, "speech_only": 0.2, "interleaved": 0.2}


@functools.lru_cache(maxsize=4096)
def synthesize(text: str, speed: int = 160, pitch: int = 50) -> torch.Tensor:
    """Speak ``text`` with espeak-ng; returns a waveform at the project sample rate."""
    program = need_program("espeak-ng", "speech", "apt-get install espeak-ng")
    fd, path = tempfile.mkstemp(suffix=".wav")
    os.close(fd)
    try:
        cmd = [program, "-s", str(speed), "-p", str(pitch), "-w", path, text]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        return read_wav(path, where=f"espeak-ng {text[:30]!r}")
    finally:
        os.unlink(path)


class SpeechSynthSource:
    """Unlimited, deterministic text+speech documents.

    Args:
        seed: corpus seed.
        split: ``"train"`` or ``"val"`` (disjoint seed streams).
    """

    name = "speech"
    modalities = [TEXT, SPEECH]

    def __init__(self, *, seed: int = 0, split: str = "train") -> None:
        need_program("espeak-ng", self.name, "apt-get install espeak-ng")
        self.seed, self.split = seed, split

    def fingerprint(self) -> str:
        return "speech-espeak-v1"

    def _sentences(self, rng: random.Random, n: int) -> list[str]:
        return [st.caption(random_scene(rng), rng) for _ in range(n)]

    def document(self, index: int) -> Document:
        key = f"speech|{self.seed}|{self.split}|{index}".encode()
        rng = random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big"))
        kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
        voice = (rng.randrange(130, 200), rng.randrange(30, 71))
        meta = {"source": self.name, "split": self.split, "index": index, "kind": kind}
        if kind == "interleaved":
            sentences = self._sentences(rng, rng.choice((2, 3, 4)))
            first = rng.random() < 0.5
            segments = [
                Segment(SPEECH, synthesize(s, *voice))
                if (i % 2 == 0) == first
                else Segment(TEXT, s)
                for i, s in enumerate(sentences)
            ]
            return Document(segments=segments, meta={**meta, "captions": sentences})
        (text,) = self._sentences(rng, 1)
        speech = Segment(SPEECH, synthesize(text, *voice))
        if kind == "speech_only":
            segments = [speech]
        elif kind == "text_speech":
            segments = [Segment(TEXT, text), speech]
        else:
            segments = [speech, Segment(TEXT, text)]
        return Document(segments=segments, meta={**meta, "captions": [text]})
