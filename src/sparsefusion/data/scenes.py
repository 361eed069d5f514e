"""The built-in procedural corpus: coloured shapes on plain backgrounds, with English text.

Every document is a pure function of (seed, split, index): a local ``random.Random`` is seeded
from a hash of the three, so any index can be read in any order and on any rank, and train and val
draw from disjoint seed streams (val is held out). Needs only Pillow.

Document kinds (mixed with configurable weights):
    caption_image: [caption, image]
    image_caption: [image, caption]
    text_only:     [passage] (a few sentences about shapes, colours and scenes)
    interleaved:   [text, image, text, image (, text, image) (, text)]: a scene edited step by step
``Document.meta`` holds ``kind``, ``captions`` (one per image) and ``scenes`` (one dict per image,
with every shape's kind, colour, size and position).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Literal

from sparsefusion.data import scene_text as st
from sparsefusion.data.documents import IMAGE, TEXT, Document, Segment
from sparsefusion.data.scene_draw import evolve, random_scene, render_scene

CORPUS_VERSION = "scenes-v1"
DOC_KINDS = ("caption_image", "image_caption", "text_only", "interleaved")
DEFAULT_DOC_MIX = {
    "caption_image": 0.35,
    "image_caption": 0.25,
    "text_only": 0.2,
    "interleaved": 0.2,
}


def validate_doc_mix(doc_mix: dict[str, float], field: str = "doc_mix") -> None:
    """Check a document-kind mixture.

    Args:
        doc_mix: relative weight per document kind.
        field: name used in error messages.

    Raises:
        ValueError: on an unknown kind, a negative weight, or a non-positive sum.
    """
    unknown = sorted(set(doc_mix) - set(DOC_KINDS))
    if unknown:
        raise ValueError(f"{field}: unknown document kinds {unknown}; valid: {list(DOC_KINDS)}")
    if any(w < 0 for w in doc_mix.values()):
        raise ValueError(f"{field}: weights must be non-negative, got {doc_mix}")
    if sum(doc_mix.values()) <= 0:
        raise ValueError(f"{field}: weights must have a positive sum, got {doc_mix}")


class SceneCorpus:
    """Unlimited, deterministic, random-access corpus of mixed-modal scene documents.

    Args:
        seed: corpus seed.
        split: ``"train"`` or ``"val"`` (disjoint seed streams).
        image_size: side of the square RGB images, in pixels.
        doc_mix: relative weights of the document kinds (``DOC_KINDS``); ``None`` for the default.
    """

    name = "scenes"

    def __init__(
        self,
        *,
        seed: int = 0,
        split: Literal["train", "val"] = "train",
        image_size: int = 32,
        doc_mix: dict[str, float] | None = None,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.seed, self.split, self.image_size = seed, split, image_size
        mix = dict(DEFAULT_DOC_MIX if doc_mix is None else doc_mix)
        validate_doc_mix(mix)
        self._kinds = [k for k in DOC_KINDS if mix.get(k, 0.0) > 0]
        self._weights = [mix[k] for k in self._kinds]

    def fingerprint(self) -> str:
        """Identity of the content distribution: version and image size, not seed or split."""
        return f"{CORPUS_VERSION}-img{self.image_size}"

    def rng(self, index: int) -> random.Random:
        """The private RNG of document ``index`` (seeded from a hash of seed, split and index)."""
        key = f"{CORPUS_VERSION}|{self.seed}|{self.split}|{index}".encode()
        return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big"))

    def document(self, index: int) -> Document:
        """Document ``index`` (any non-negative int; the same index gives an identical document)."""
        if index < 0:
            raise ValueError(f"index must be non-negative, got {index}")
        rng = self.rng(index)
        kind = rng.choices(self._kinds, weights=self._weights)[0]
        meta: dict[str, Any] = {"source": self.name, "split": self.split, "index": index}
        meta["kind"] = kind
        if kind == "text_only":
            meta.update(captions=[], scenes=[])
            return Document(segments=[Segment(TEXT, st.passage(rng))], meta=meta)
        if kind == "interleaved":
            return self._interleaved(rng, meta)
        scene = random_scene(rng)
        caption = st.caption(scene, rng)
        image = Segment(IMAGE, render_scene(scene, self.image_size, rng))
        text = Segment(TEXT, caption)
        segments = [text, image] if kind == "caption_image" else [image, text]
        meta.update(captions=[caption], scenes=[scene.to_dict()])
        return Document(segments=segments, meta=meta)

    def _interleaved(self, rng: random.Random, meta: dict[str, Any]) -> Document:
        scenes = [random_scene(rng)]
        texts = [st.interleaved_intro(scenes[0], rng)]
        num_steps = rng.choice((1, 2))
        for step in range(num_steps):
            scene, edit = evolve(scenes[-1], rng)
            scenes.append(scene)
            texts.append(st.interleaved_step(edit, step, num_steps, rng))
        segments = []
        for text, scene in zip(texts, scenes, strict=True):
            segments.append(Segment(TEXT, text))
            segments.append(Segment(IMAGE, render_scene(scene, self.image_size, rng)))
        if rng.random() < 0.5:
            segments.append(Segment(TEXT, st.interleaved_outro(scenes[-1], rng)))
        captions = [st.caption(s, rng) for s in scenes]
        meta.update(captions=captions, scenes=[s.to_dict() for s in scenes])
        return Document(segments=segments, meta=meta)
