"""Documents: ordered lists of (modality, payload) segments. Sources know nothing about tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TEXT = "text"
IMAGE = "image"
SPEECH = "speech"


@dataclass(frozen=True)
class Segment:
    """One piece of a document.

    Attributes:
        modality: modality name (``"text"``, ``"image"``, ``"speech"``, ...).
        payload: a ``str`` for text, a ``PIL.Image.Image`` (RGB) for images, a float waveform
            for speech.
    """

    modality: str
    payload: Any


@dataclass
class Document:
    """An interleaved mixed-modal document.

    Attributes:
        segments: the segments in reading order.
        meta: free-form provenance (source name, index, caption ...), never tokenized.
    """

    segments: list[Segment]
    meta: dict[str, Any] = field(default_factory=dict)

    def modalities(self) -> list[str]:
        return [s.modality for s in self.segments]
