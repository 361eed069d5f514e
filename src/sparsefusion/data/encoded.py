"""Encoded documents: their positions, the segments they came from, and their continuous spans.

A tokenizer turns a document into positions: unified ids and the modality index of each. A
discrete tokenizer (``tokenizers/multimodal.py``) returns ``(ids, modalities)`` per document; the
Transfusion tokenizer (``tokenizers/transfusion.py``) returns an :class:`Encoded` that also
records where each segment lies (:class:`Part`). A continuous span is a segment framed by two
sentinels (``BOI p_1 .. p_n EOI``) whose inner positions are placeholders for one value (an
image's latent) that travels beside the ids. Packing (``packing.py``) keeps a framed span in one
row, takes no next-token target at or into a placeholder, and hands the values to the batch.

:class:`CaptionOrder` re-orders the image-caption pairs of encoded documents (Transfusion's
caption-first and caption-dropout rule); the objective that wants it says so
(``objectives/base.py``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from sparsefusion.data.documents import IMAGE, TEXT


@dataclass(frozen=True)
class Part:
    """One segment of an encoded document: positions ``[start, stop)``.

    Attributes:
        modality: the segment's modality name.
        start: its first position.
        stop: one past its last position.
        value: the value of a continuous span (an image's latent, (Z, h, w)): positions ``start``
            and ``stop - 1`` are its sentinels, the ones between are its placeholders. None for
            a discrete segment.
        early: a continuous span that precedes its caption (set by :class:`CaptionOrder`).
    """

    modality: str
    start: int
    stop: int
    value: torch.Tensor | None = None
    early: bool = False


@dataclass
class Encoded:
    """A document in positions.

    Attributes:
        ids: unified ids (a list or an int array).
        modalities: modality index of each id.
        parts: its segments in order (empty when the tokenizer does not record them; then the
            document has no continuous span).
    """

    ids: Any
    modalities: Any
    parts: list[Part] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def spans(self) -> list[Part]:
        """The continuous spans, in order."""
        return [p for p in self.parts if p.value is not None]

    def arranged(self, order: Sequence[Part], *, early: bool = False) -> Encoded:
        """The document with its parts in ``order`` (parts left out are dropped); what comes
        before the first part and after the last (BOS, EOS) stays. ``early`` marks the
        continuous spans of the result."""
        ids, mods = np.asarray(self.ids, dtype=np.int64), np.asarray(self.modalities, np.int64)
        head, tail = self.parts[0].start, self.parts[-1].stop
        id_pieces, mod_pieces, parts, at = [ids[:head]], [mods[:head]], [], head
        for p in order:
            id_pieces.append(ids[p.start : p.stop])
            mod_pieces.append(mods[p.start : p.stop])
            n = p.stop - p.start
            parts.append(replace(p, start=at, stop=at + n, early=early and p.value is not None))
            at += n
        id_pieces.append(ids[tail:])
        mod_pieces.append(mods[tail:])
        return Encoded(np.concatenate(id_pieces), np.concatenate(mod_pieces), parts)


def as_encoded(encoded: Any) -> Encoded:
    """An :class:`Encoded` from a tokenizer's result (an ``Encoded`` or ``(ids, modalities)``)."""
    if isinstance(encoded, Encoded):
        return encoded
    ids, modalities = encoded
    return Encoded(ids, modalities)


@dataclass(frozen=True)
class CaptionOrder:
    """Orders each image-caption pair (a document of exactly one image and one text segment).

    The pair is ordered caption -> image with probability ``caption_first`` (else image ->
    caption: captioning data, its image marked ``early``), and a caption-first pair loses its
    caption with probability ``caption_dropout`` (the unconditional data of classifier-free
    guidance). Both draws are a function of (seed, document index in the stream), so a resumed
    loader makes the same decisions. Other documents are kept as they are.

    Attributes:
        seed: the run's seed.
        caption_first: probability of caption -> image.
        caption_dropout: probability that a caption-first pair loses its caption.
    """

    seed: int
    caption_first: float
    caption_dropout: float

    def __call__(self, encoded: Encoded, uid: int) -> Encoded:
        """``encoded`` (document ``uid`` of the stream) arranged."""
        mods = [p.modality for p in encoded.parts]
        if sorted(mods) != [IMAGE, TEXT]:
            return encoded
        rng = random.Random(self.seed * 1_000_003 + uid)
        first = rng.random() < self.caption_first
        drop = rng.random() < self.caption_dropout
        image, text = encoded.parts[mods.index(IMAGE)], encoded.parts[mods.index(TEXT)]
        if first and drop:
            return encoded.arranged([image])
        if first:
            return encoded.arranged([text, image])
        return encoded.arranged([image, text], early=True)
