"""A prompts file: JSONL of documents, as in the training format, one request per line.

A line is a list of segments or ``{"segments": [...], ...}`` (see ``data/jsonl_source.py``);
paths are relative to the file. The object form may also set the request's options by name
(``mode``, ``num_samples``, ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
``repetition_penalty``, ``cfg_scale``, ``seed``); the others come from the command line. Without
``mode`` a document that ends with an image is captioned (``image_to_text``), one that ends with
speech is transcribed (``speech_to_text``) and any other is continued (``text``). A malformed
line, a missing or unreadable file or an unknown option raises ``ValueError`` naming
``file:line``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sparsefusion.data.documents import IMAGE, SPEECH, TEXT, Document
from sparsefusion.generate.request import GenerationRequest

OPTIONS = (
    "mode",
    "num_samples",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "cfg_scale",
    "seed",
)
_IGNORED_META = ("source", "where", "index", "captions", "id")


def read_prompts(path: str | Path, base: GenerationRequest, image_size: int):
    """One request per non-empty line of ``path`` (options default to ``base``'s)."""
    from sparsefusion.data.jsonl_source import JsonlSource

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts: {path} is not a file")
    source = JsonlSource(str(path), split="train", image_size=image_size, val_fraction=0.0)
    if len(source) == 0:
        raise ValueError(f"--prompts: {path} holds no prompt lines")
    return [_request(source.document(i), base) for i in range(len(source))]


def _request(doc: Document, base: GenerationRequest) -> GenerationRequest:
    where = doc.meta["where"]
    unknown = sorted(k for k in doc.meta if k not in OPTIONS and k not in _IGNORED_META)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; known: {list(OPTIONS)}")
    options: dict[str, Any] = {k: doc.meta[k] for k in OPTIONS if k in doc.meta}
    options.setdefault("mode", _default_mode(doc))
    prompt = " ".join(s.payload for s in doc.segments if s.modality == TEXT)
    return dataclasses.replace(base, prompt=prompt, document=doc, where=where, **options)


def _default_mode(doc: Document) -> str:
    last = doc.segments[-1].modality
    return {IMAGE: "image_to_text", SPEECH: "speech_to_text"}.get(last, "text")
