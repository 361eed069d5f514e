"""Caption-image pairs read from any document source, and the word vocabulary of their captions.

A pair is an image segment with its caption: the text of a two-segment document (text then image,
or image then text), or, when a document's ``meta["captions"]`` holds one caption per image (the
built-in scenes' interleaved pages), each image with its own caption. Documents without images
give no pairs. Reading is deterministic: documents ``start, start + 1, ...`` in order.

When a document's ``meta["scenes"]`` describes each image (the built-in scenes: background, and
each shape's kind, colour, size and cell), a pair also carries those visual attributes, and the
feature network learns them instead of caption words (a caption's wording is partly chosen by a
template, which no image can predict).

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
from sparsefusion.data.text import read_document

_WORD = re.compile(r"[a-z0-9']+")
PAD, UNK = 0, 1


@dataclass(frozen=True)
class Pair:
    """One image, its caption and (when the source describes its images) visual attributes."""

    image: Image.Image
    caption: str
    attributes: frozenset[str] | None = None


def words(text: str) -> list[str]:
    """Lower-cased words of a caption (punctuation dropped), as CIDEr and the evaluators read it."""
    return _WORD.findall(text.lower())


def scene_attributes(scene: Any) -> frozenset[str] | None:
    """``background:...``, ``shape:...``, ``color:...``, ``size:...`` and ``count:N`` of one
    built-in scene description (None if it is not one)."""
    if not isinstance(scene, dict) or not isinstance(scene.get("shapes"), list):
        return None
    out = {f"background:{scene.get('background')}", f"count:{len(scene['shapes'])}"}
    for sh in scene["shapes"]:
        if not isinstance(sh, dict):
            return None
        out |= {f"shape:{sh.get('shape')}", f"color:{sh.get('color')}", f"size:{sh.get('size')}"}
    return frozenset(out)


def document_pairs(doc: Document) -> list[Pair]:
    """The caption-image pairs of one document (see the module docstring)."""
    images = [s.payload for s in doc.segments if s.modality == IMAGE]
    texts = [s.payload for s in doc.segments if s.modality == TEXT]
    meta = doc.meta if isinstance(doc.meta, dict) else {}
    scenes = meta.get("scenes")
    if not (isinstance(scenes, list) and len(scenes) == len(images)):
        scenes = [None] * len(images)
    attrs = [scene_attributes(s) for s in scenes]
    captions = meta.get("captions")
    if images and isinstance(captions, list) and len(captions) == len(images):
        items = zip(images, captions, attrs, strict=True)
        return [Pair(im, str(c), a) for im, c, a in items if str(c).strip()]
    if len(images) == 1 and len(texts) == 1 and len(doc.segments) == 2 and texts[0].strip():
        return [Pair(images[0], texts[0], attrs[0])]
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
            doc = read_document(source, index)
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


def _frequent(counts: Counter, n: int, lo: float, hi: float) -> list[str]:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [w for w, c in ranked if lo * n <= c <= hi * n]


class WordVocab:
    """Caption words -> ids (0 padding, 1 unknown), and the labels of the feature network.

    Args:
        itos: the words, in id order from 2.
        labels: the labels: visual attributes (``label_source="attributes"``) or caption words.
        label_source: ``attributes`` or ``words``.
    """

    def __init__(self, itos: list[str], labels: list[str], label_source: str = "words") -> None:
        self.itos = list(itos)
        self.labels = list(labels)
        self.label_source = label_source
        self._stoi = {w: i + 2 for i, w in enumerate(self.itos)}
        self._label_index = {w: i for i, w in enumerate(self.labels)}

    @classmethod
    def build(cls, pairs: Sequence[Pair], *, max_words: int, num_labels: int) -> WordVocab:
        """Words seen at least twice (most frequent first). Labels: the visual attributes in
        1-99% of pairs when every pair has attributes, else the caption words in 2-90% of
        captions (content words: colours, shapes, places, classes); most frequent first."""
        captions = [p.caption for p in pairs]
        tf: Counter = Counter(w for c in captions for w in words(c))
        itos = [w for w, n in sorted(tf.items(), key=lambda kv: (-kv[1], kv[0])) if n >= 2]
        n = max(1, len(pairs))
        if pairs and all(p.attributes for p in pairs):
            df: Counter = Counter(a for p in pairs for a in p.attributes or ())
            return cls(itos[:max_words], _frequent(df, n, 0.01, 0.99)[:num_labels], "attributes")
        df = Counter(w for c in captions for w in set(words(c)))
        return cls(itos[:max_words], _frequent(df, n, 0.02, 0.9)[:num_labels], "words")

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

    def label_targets(self, pairs: Sequence[Pair]) -> torch.Tensor:
        """Multi-hot labels of each pair: (N, num_labels)."""
        out = torch.zeros(len(pairs), len(self.labels))
        for i, p in enumerate(pairs):
            have = p.attributes if self.label_source == "attributes" else set(words(p.caption))
            for label in have or ():
                j = self._label_index.get(label)
                if j is not None:
                    out[i, j] = 1.0
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"itos": self.itos, "labels": self.labels, "label_source": self.label_source}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WordVocab:
        return cls(list(data["itos"]), list(data["labels"]), str(data.get("label_source", "words")))
