"""``sparsefusion generate RUN_DIR --demo``: what a run makes, from its own held-out documents.

From the run's val split (the built-in corpus, or the user's data) it takes documents until it
has ``per_kind`` of each: a caption followed by an image (the caption becomes a text -> image
prompt), an image followed by text (the image is captioned), and a text document (its first
words are continued). Sampling options come from the base request (its guidance scale only for
the text -> image prompts).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparsefusion.data.documents import IMAGE, TEXT, Document
from sparsefusion.generate.request import GenerationRequest

MAX_DOCS = 400  # documents read at most while looking for every kind


def demo_requests(
    run_config: Any, base: GenerationRequest, modes: list[str], per_kind: int = 2
) -> list[GenerationRequest]:
    """Requests for a caption, an image and a continuation (those the run serves)."""
    from sparsefusion.data.sources import build_source
    from sparsefusion.data.text import read_document

    source = build_source(run_config.data, seed=run_config.seed, split="val")
    size = len(source) if hasattr(source, "__len__") else MAX_DOCS
    found: dict[str, list[GenerationRequest]] = {m: [] for m in _KINDS if m in modes}
    for i in range(min(size, MAX_DOCS)):
        if all(len(v) >= per_kind for v in found.values()):
            break
        try:
            doc = read_document(source, i)
        except ValueError:  # a bad user document: skip it, as training does
            continue
        for mode, make in _KINDS.items():
            if mode in found and len(found[mode]) < per_kind:
                req = make(doc, base)
                if req is not None:
                    found[mode].append(req)
                    break
    requests = [r for mode in _KINDS if mode in found for r in found[mode]]
    if not requests:
        raise ValueError("--demo found no usable documents in the run's val split")
    return requests


def _text_to_image(doc: Document, base: GenerationRequest) -> GenerationRequest | None:
    segs = doc.segments
    if len(segs) >= 2 and segs[0].modality == TEXT and segs[1].modality == IMAGE:
        return dataclasses.replace(base, prompt=segs[0].payload.strip(), mode="text_to_image")
    return None


def _image_to_text(doc: Document, base: GenerationRequest) -> GenerationRequest | None:
    segs = doc.segments
    if len(segs) >= 2 and segs[0].modality == IMAGE and segs[1].modality == TEXT:
        return dataclasses.replace(
            base, prompt="", image=segs[0].payload, mode="image_to_text", cfg_scale=1.0
        )
    return None


def _text(doc: Document, base: GenerationRequest) -> GenerationRequest | None:
    if [s.modality for s in doc.segments] != [TEXT]:
        return None
    words = doc.segments[0].payload.split()
    if len(words) < 8:
        return None
    return dataclasses.replace(base, prompt=" ".join(words[:6]), mode="text", cfg_scale=1.0)


_KINDS = {"image_to_text": _image_to_text, "text_to_image": _text_to_image, "text": _text}
