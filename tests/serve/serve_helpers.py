"""Test helpers for the server tests: a fake backend (tests only: controllable timing for the
queue tests) and a live uvicorn server in a thread."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

STEPS = 6  # the tiny runs' length (checkpoints at 3 and 6)


@dataclass
class FakeSegment:
    modality: str
    text: str | None = None
    image: Image.Image | None = None
    audio: np.ndarray | None = None
    sample_rate: int = 16000


@dataclass
class FakeSample:
    segments: list[FakeSegment]
    token_ids: list[int]
    new_tokens: int
    seconds: float


@dataclass
class FakeModel:
    """Echoes the prompt, draws a seed-coloured 8x6 image, 0.1 s of audio; can block on a gate."""

    modes: list[str]
    gate: threading.Event | None = None
    running: list[int] = field(default_factory=lambda: [0, 0])  # now, max
    lock: threading.Lock = field(default_factory=threading.Lock)

    def generate(self, params) -> list[FakeSample]:
        with self.lock:
            self.running[0] += 1
            self.running[1] = max(self.running)
        try:
            if self.gate is not None:
                assert self.gate.wait(30), "test gate never opened"
            return [self._sample(params, i) for i in range(params.num_samples)]
        finally:
            with self.lock:
                self.running[0] -= 1

    def _sample(self, params, i: int) -> FakeSample:
        segments = [FakeSegment("text", text=f"{params.prompt} #{i}")]
        if params.mode == "text_to_image":
            segments.append(
                FakeSegment("image", image=Image.new("RGB", (8, 6), (params.seed, 0, i)))
            )
        if params.mode == "text_to_speech":
            segments.append(FakeSegment("speech", audio=np.zeros(1600, np.float32)))
        if params.image is not None:
            segments.append(FakeSegment("text", text=f"saw {params.image.size}"))
        return FakeSample(segments, [1, 2, 3], new_tokens=3, seconds=0.01)


class FakeBackend:
    """Counts loads per (run, step); every model serves ``modes``."""

    def __init__(self, modes=("text", "text_to_image", "image_to_text"), gate=None) -> None:
        self.modes, self.gate = list(modes), gate
        self.loads: list[tuple[str, int]] = []
        self.models: dict[tuple[str, int], FakeModel] = {}

    def load(self, run, step) -> FakeModel:
        self.loads.append((run.name, step))
        model = FakeModel(self.modes, self.gate)
        self.models[(run.name, step)] = model
        return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving an app in a background thread on 127.0.0.1."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
