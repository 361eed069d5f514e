"""Caption-image pairs read from any document source, and the word vocabulary of their captions.

A pair is an image segment with its caption: the text of a two-segment document (text then image,
or image then text), or, when a document's ``meta["captions"]`` holds one caption per image (the
built-in scenes' interleaved pages), each image with its own caption. Documents without images
give no pairs. Reading is deterministic: documents ``start, start + 1, ...`` in order.

Legend: N = images, C = channels (3), H = W = image side, L = words of a caption.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from sparsefusion.data.documents import IMAGE, TEXT, Document
from sparsefusion.data.issues import BadInput

_WORD = re.compile(r"[a-z0-9']+")
PAD, UNK = 0, 1


@dataclass(frozen=True)
class Pair:
    """One image and its caption."""

    image: Image.Image
    caption: str


def words(text: str) -> list[str]:
    """Lower-cased words of a caption (punctuation dropped), as CIDEr and the evaluators read it."""
    return _WORD.findall(text.lower())


def document_pairs(doc: Document) -> list[Pair]:
    """The caption-image pairs of one document (see the module docstring)."""
    images = [s.payload for s in doc.segments if s.modality == IMAGE]
    texts = [s.payload for s in doc.segments if s.modality == TEXT]
    captions = doc.meta.get("captions") if isinstance(doc.meta, dict) else None
    if images and isinstance(captions, list) and len(captions) == len(images):
        return [Pair(im, str(c)) for im, c in zip(images, captions, strict=True) if str(c).strip()]
    if len(images) == 1 and len(texts) == 1 and len(doc.segments) == 2 and texts[0].strip():
        return [Pair(images[0], texts[0])]
    return []


def read_pairs(source: Any, num: int, *, start: int = 0, max_docs: int = 0) -> list[Pair]:
    """Up to ``num`` pairs from documents ``start, start + 1, ...`` of ``source``.

    Stops early at the end of a finite source or after ``max_docs`` documents (default
    ``20 * num + 100``) without enough pairs. Bad documents (``BadInput``) are skipped.
    """
    max_docs = max_docs or 20 * num + 100
    pairs: list[Pair] = []
    index = start
    while len(pairs) < num and index < start + max_docs:
        try:
            doc = source.document(index)
        except IndexError:
            break
        except BadInput:
            index += 1
            continue
        pairs.extend(document_pairs(doc))
        index += 1
    return pairs[:num]


def images_to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """RGB images as floats in [0, 1], resized to ``size`` x ``size``: (N, 3, size, size)."""
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
    if not arrays:
        return torch.zeros(0, 3, size, size)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class WordVocab:
    """Caption words -> ids (0 padding, 1 unknown), and the label words of the feature network.

    Args:
        itos: the words, in id order from 2.
        labels: the label words (a subset of ``itos``).
    """

    def __init__(self, itos: list[str], labels: list[str]) -> None:
        self.itos = list(itos)
        self.labels = list(labels)
        self._stoi = {w: i + 2 for i, w in enumerate(self.itos)}
        self._label_index = {w: i for i, w in enumerate(self.labels)}

    @classmethod
    def build(cls, captions: Sequence[str], *, max_words: int, num_labels: int) -> WordVocab:
        """Words seen at least twice (most frequent first); labels are the words in 2-90% of
        captions, most frequent first (content words: colours, shapes, places, classes)."""
        tf: Counter = Counter(w for c in captions for w in words(c))
        df: Counter = Counter(w for c in captions for w in set(words(c)))
        itos = [w for w, n in sorted(tf.items(), key=lambda kv: (-kv[1], kv[0])) if n >= 2]
        n = max(1, len(captions))
        label_words = [w for w in itos if 0.02 * n <= df[w] <= 0.9 * n]
        return cls(itos[:max_words], label_words[:num_labels])

    @property
    def size(self) -> int:
        return len(self.itos) + 2

    def encode(self, captions: Sequence[str], max_len: int) -> torch.Tensor:
        """Word ids, padded with 0 and cut to ``max_len``: (N, max_len)."""
        out_NL = torch.zeros(len(captions), max_len, dtype=torch.long)
        for i, c in enumerate(captions):
            ids = [self._stoi.get(w, UNK) for w in words(c)][:max_len] or [UNK]
            out_NL[i, : len(ids)] = torch.tensor(ids)
        return out_NL

    def label_targets(self, captions: Sequence[str]) -> torch.Tensor:
        """Multi-hot label words of each caption: (N, num_labels)."""
        out = torch.zeros(len(captions), len(self.labels))
        for i, c in enumerate(captions):
            for w in set(words(c)):
                j = self._label_index.get(w)
                if j is not None:
                    out[i, j] = 1.0
        return out

    def to_dict(self) -> dict[str, list[str]]:
        return {"itos": self.itos, "labels": self.labels}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WordVocab:
        return cls(list(data["itos"]), list(data["labels"]))
