"""A weighted mixture of sources, deterministic by index.

Document ``index`` draws its source from a private RNG (seeded from a hash of seed, split and
index) with the configured weights, then a document of that source: a uniformly drawn index for a
finite source (``__len__``), a large random index for an unlimited one. The mixture itself is
unlimited. Its modalities are the union of its sources' in vocabulary order (text, image, speech).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from sparsefusion.data.documents import IMAGE, SPEECH, TEXT, Document

MODALITY_ORDER = (TEXT, IMAGE, SPEECH)
DEFAULT_MODALITIES = [TEXT, IMAGE]


def source_modalities(source: Any) -> list[str]:
    """The modalities a source can emit (``[text, image]`` when it does not say)."""
    return list(getattr(source, "modalities", DEFAULT_MODALITIES))


def vocab_modalities(source: Any) -> list[str]:
    """Vocabulary modalities for a source: text and image always, speech when it has speech."""
    mods = set(source_modalities(source)) | {TEXT, IMAGE}
    return [m for m in MODALITY_ORDER if m in mods]


class MixtureSource:
    """Sample documents from several sources with fixed weights.

    Args:
        sources: name -> source.
        weights: name -> relative sampling weight (positive).
        seed: seed of the source choice.
        split: ``"train"`` or ``"val"``.
    """

    name = "mixture"

    def __init__(
        self,
        sources: dict[str, Any],
        weights: dict[str, float],
        *,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        if set(sources) != set(weights) or not sources:
            raise ValueError(f"mixture: sources {sorted(sources)} != weights {sorted(weights)}")
        self._names = sorted(sources)
        self._sources = sources
        self._weights = [float(weights[n]) for n in self._names]
        self.seed, self.split = seed, split
        mods = {m for s in sources.values() for m in source_modalities(s)}
        self.modalities = [m for m in MODALITY_ORDER if m in mods]

    def fingerprint(self) -> str:
        parts = [
            f"{n}:{w:g}:{self._sources[n].fingerprint()}"
            for n, w in zip(self._names, self._weights, strict=True)
        ]
        return "mix-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def document(self, index: int) -> Document:
        key = f"mixture|{self.seed}|{self.split}|{index}".encode()
        rng = random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big"))
        name = rng.choices(self._names, weights=self._weights)[0]
        src = self._sources[name]
        sub = rng.randrange(len(src)) if hasattr(src, "__len__") else rng.randrange(1 << 40)
        doc = src.document(sub)
        doc.meta.setdefault("source", name)
        return doc
