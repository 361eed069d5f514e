"""Generated samples and the output folder: text, PNGs, WAVs, token ids and one HTML page.

``write_samples(samples, out)`` writes, for sample k, ``sample_k.txt`` (its text segments),
``sample_k_image_j.png`` and ``sample_k_speech_j.wav``, then ``tokens.json`` (prompt and new
ids of every sample), ``index.html``, which shows every sample in order with its images
inline and audio players, by relative links (it opens from disk), and ``grid.png``: one cell per
sample (its image, or the image it captions, above its text).
"""

from __future__ import annotations

import html
import json
import textwrap
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Segment:
    """One decoded piece of a sample.

    Attributes:
        modality: "text", "image" or "speech".
        text: the text (text segments).
        image: the decoded image (image segments).
        audio: the waveform in [-1, 1] (speech segments).
        sample_rate: samples per second of ``audio``.
    """

    modality: str
    text: str | None = None
    image: Image.Image | None = None
    audio: np.ndarray | None = None
    sample_rate: int = 16000


@dataclass
class Sample:
    """One generated sample (one request, one sample index).

    Attributes:
        segments: the new content in the order the model emitted it.
        token_ids: the new ids (forced openers such as BOI included).
        new_tokens: len(token_ids).
        seconds: wall seconds of the decode batch that produced it.
        prompt: the request's text prompt.
        mode: the request's mode.
        request: index of the request in the ``generate`` call.
        index: sample index within the request.
        prompt_ids: the prompt's ids.
        prompt_segments: the prompt's non-text inputs (e.g. the image to caption).
    """

    segments: list[Segment]
    token_ids: list[int]
    new_tokens: int
    seconds: float
    prompt: str = ""
    mode: str = "text"
    request: int = 0
    index: int = 0
    prompt_ids: list[int] = field(default_factory=list)
    prompt_segments: list[Segment] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The sample's text segments joined."""
        return "".join(s.text or "" for s in self.segments if s.modality == "text")

    @property
    def images(self) -> list[Image.Image]:
        return [s.image for s in self.segments if s.image is not None]


def write_samples(samples: list[Sample], out: str | Path) -> Path:
    """Write every sample's files, ``tokens.json`` and ``index.html`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blocks, tokens = [], []
    for k, sample in enumerate(samples):
        name = f"sample_{k:03d}"
        inputs = _write_segments(sample.prompt_segments, out, f"{name}_input")
        parts = _write_segments(sample.segments, out, name)
        (out / f"{name}.txt").write_text(sample.text, encoding="utf-8")
        tokens.append(
            {
                "sample": name,
                "request": sample.request,
                "index": sample.index,
                "mode": sample.mode,
                "prompt": sample.prompt,
                "prompt_ids": sample.prompt_ids,
                "token_ids": sample.token_ids,
                "seconds": round(sample.seconds, 4),
            }
        )
        blocks.append(_html_block(name, sample, inputs, parts))
    (out / "tokens.json").write_text(json.dumps(tokens, indent=1), encoding="utf-8")
    page = _PAGE.format(count=len(samples), body="\n".join(blocks))
    (out / "index.html").write_text(page, encoding="utf-8")
    if samples:
        sample_grid(samples).save(out / "grid.png")
    return out


def sample_grid(samples: list[Sample], cell: int = 112, columns: int = 6) -> Image.Image:
    """One cell per sample: its first image (generated, else the prompt's) above its text."""
    from PIL import ImageDraw

    rows = -(-len(samples) // columns)
    text_h = 64
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for k, s in enumerate(samples):
        x, y = (k % columns) * cell, (k // columns) * (cell + text_h)
        images = s.images or [g.image for g in s.prompt_segments if g.image is not None]
        if images:
            grid.paste(images[0].resize((cell - 8, cell - 8), Image.NEAREST), (x + 4, y + 4))
        words = s.prompt if s.mode == "text_to_image" else (s.prompt + " | " + s.text).strip(" |")
        top, room = (y + cell, text_h) if images else (y + 4, cell + text_h - 8)
        lines = textwrap.wrap(words, width=cell // 6)[: room // 12]
        draw.multiline_text((x + 4, top), "\n".join(lines), fill="black", spacing=1)
    return grid


def _write_segments(segments: list[Segment], out: Path, stem: str) -> list[str]:
    """Files for the image/speech segments, HTML for every segment, in order."""
    parts, n_img, n_wav = [], 0, 0
    for seg in segments:
        if seg.modality == "image" and seg.image is not None:
            file = f"{stem}_image_{n_img}.png"
            seg.image.save(out / file)
            n_img += 1
            parts.append(f'<img src="{file}" alt="{file}">')
        elif seg.modality == "speech" and seg.audio is not None:
            file = f"{stem}_speech_{n_wav}.wav"
            write_wav(out / file, seg.audio, seg.sample_rate)
            n_wav += 1
            parts.append(f'<audio controls src="{file}"></audio>')
        elif seg.text:
            parts.append(f"<span class=t>{html.escape(seg.text)}</span>")
    return parts


def write_wav(path: Path, audio: np.ndarray, rate: int) -> None:
    """Mono 16-bit PCM."""
    pcm = (np.clip(np.asarray(audio, dtype=np.float32), -1, 1) * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def _html_block(name: str, sample: Sample, inputs: list[str], parts: list[str]) -> str:
    head = (
        f"<h2>{name} <small>request {sample.request}, sample {sample.index}, "
        f"{html.escape(sample.mode)}, {sample.new_tokens} new tokens</small></h2>"
    )
    prompt = html.escape(sample.prompt) if sample.prompt else "<i>(no text)</i>"
    given = " ".join(inputs)
    body = " ".join(parts) if parts else "<i>(nothing generated)</i>"
    return (
        f"<section>{head}<div class=p>prompt: {given} {prompt}</div>"
        f"<div class=g>{body}</div></section>"
    )


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sparsefusion samples</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}
section {{ border-top: 1px solid #ccc; padding: .5em 0; }}
.p {{ color: #555; margin-bottom: .4em; }}
.t {{ white-space: pre-wrap; }}
img {{ width: 128px; image-rendering: pixelated; vertical-align: middle; margin: 2px; }}
</style></head>
<body><h1>{count} samples</h1>
{body}
</body></html>
"""
