"""Generated samples as JSON for the page: segments in the order the model emitted them.

Images become PNG data URLs and audio WAV data URLs, so the browser shows them directly and the
server keeps no generated files.
"""

from __future__ import annotations

import base64
import io
import wave
from typing import Any

import numpy as np
from PIL import Image


def image_data_url(image: Image.Image) -> str:
    """A PNG data URL of an image."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def wav_data_url(audio: np.ndarray, sample_rate: int) -> str:
    """A 16-bit PCM mono WAV data URL of float samples in [-1, 1]."""
    pcm = (np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0) * 32767.0).astype(
        "<i2"
    )
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def segment_json(segment: Any) -> dict[str, Any]:
    """One segment (``modality`` text, image or speech) as JSON."""
    out: dict[str, Any] = {"modality": segment.modality}
    if segment.modality == "text":
        out["text"] = segment.text or ""
    elif segment.modality == "image" and segment.image is not None:
        out["image"] = image_data_url(segment.image)
        out["width"], out["height"] = segment.image.size
    elif segment.modality == "speech" and segment.audio is not None:
        out["audio"] = wav_data_url(segment.audio, segment.sample_rate)
        out["seconds"] = len(segment.audio) / float(segment.sample_rate)
    if getattr(segment, "text", None) and segment.modality != "text":
        out["text"] = segment.text  # e.g. a transcript kept beside speech
    return out


def sample_json(sample: Any) -> dict[str, Any]:
    """One sample: its segments, new tokens, seconds and tokens per second."""
    seconds = float(sample.seconds)
    return {
        "segments": [segment_json(s) for s in sample.segments],
        "new_tokens": int(sample.new_tokens),
        "seconds": seconds,
        "tokens_per_s": sample.new_tokens / seconds if seconds > 0 else None,
        "token_ids": list(sample.token_ids),
    }
