"""The unified vocabulary: one id space for special tokens, text BPE ids and image VQ codes.

Layout (global ids)::

    [0, 16)               specials <pad> <bos> <eos> <boi> <eoi> <boa> <eoa>; 7..15 reserved
    [16, 16 + T)          text BPE ids (modality index 0), T = text size
    [16 + T, 16 + T + I)  image VQ codes (modality index 1); further modalities follow in order

Sentinel rule: BOS/EOS/BOI/EOI/BOA/EOA (and PAD) are text-modality positions, i.e. they run through
the text tower (``modality_of`` maps every special id to modality 0). The loss of a position counts
toward the modality of its TARGET token: the position holding BOI predicts the first image code and
so counts as an image loss; the last image code predicts EOI and counts as a text loss.

Shape legend: N = any number of ids (the functions accept tensors of any shape).
"""

from __future__ import annotations

from typing import Any, overload

import torch

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<boa>", "<eoa>")
NUM_SPECIAL_SLOTS = 16
TEXT_MODALITY = "text"


class UnifiedVocab:
    """Id ranges of every modality inside one shared vocabulary.

    Args:
        modality_sizes: ordered mapping modality name -> number of local ids, e.g.
            ``{"text": 2048, "image": 512}``. ``"text"`` must be the first key.

    Raises:
        ValueError: when text is not first, a size is not positive, or the mapping is empty.
    """

    pad_id = 0
    bos_id = 1
    eos_id = 2
    boi_id = 3
    eoi_id = 4
    boa_id = 5
    eoa_id = 6

    def __init__(self, modality_sizes: dict[str, int]) -> None:
        names = list(modality_sizes)
        if not names or names[0] != TEXT_MODALITY:
            raise ValueError(f"modality_sizes must start with 'text', got keys {names}")
        for name, n in modality_sizes.items():
            if not isinstance(n, int) or n <= 0:
                raise ValueError(f"modality_sizes[{name!r}] must be a positive int, got {n!r}")
        self.modality_sizes: dict[str, int] = dict(modality_sizes)
        self.modalities: list[str] = names
        self._offsets: dict[str, int] = {}
        start = NUM_SPECIAL_SLOTS
        for name in names:
            self._offsets[name] = start
            start += modality_sizes[name]
        self._size = start
        # Global id at which modality i >= 1 starts; bucketize over these gives the modality index.
        self._boundaries = torch.tensor([self._offsets[m] for m in names[1:]], dtype=torch.long)

    # ---- ranges -------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Total number of used ids (specials included)."""
        return self._size

    def padded_size(self, multiple: int = 64) -> int:
        """``size`` rounded up to a multiple (embedding tables are allocated at this size)."""
        if multiple <= 0:
            raise ValueError(f"multiple must be positive, got {multiple}")
        return -(-self._size // multiple) * multiple

    def offset(self, modality: str) -> int:
        """Global id of local id 0 of ``modality``."""
        self._check(modality)
        return self._offsets[modality]

    def modality_index(self, name: str) -> int:
        """Index of a modality (0 = text)."""
        self._check(name)
        return self.modalities.index(name)

    def special_id(self, token: str) -> int:
        """Global id of a special token such as ``"<boi>"``."""
        if token not in SPECIAL_TOKENS:
            raise ValueError(f"unknown special token {token!r}; known: {SPECIAL_TOKENS}")
        return SPECIAL_TOKENS.index(token)

    # ---- conversions --------------------------------------------------------------------------

    @overload
    def to_global(self, modality: str, ids: torch.Tensor) -> torch.Tensor: ...
    @overload
    def to_global(self, modality: str, ids: list[int]) -> list[int]: ...

    def to_global(self, modality: str, ids: torch.Tensor | list[int]) -> torch.Tensor | list[int]:
        """Local ids of ``modality`` -> global ids (list ids are range-checked)."""
        off = self.offset(modality)
        if isinstance(ids, torch.Tensor):
            return ids + off
        n = self.modality_sizes[modality]
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"local {modality} id {i} outside [0, {n})")
        return [i + off for i in ids]

    @overload
    def to_local(self, modality: str, ids: torch.Tensor) -> torch.Tensor: ...
    @overload
    def to_local(self, modality: str, ids: list[int]) -> list[int]: ...

    def to_local(self, modality: str, ids: torch.Tensor | list[int]) -> torch.Tensor | list[int]:
        """Global ids -> local ids of ``modality`` (list ids are range-checked)."""
        off = self.offset(modality)
        if isinstance(ids, torch.Tensor):
            return ids - off
        n = self.modality_sizes[modality]
        for i in ids:
            if not off <= i < off + n:
                raise ValueError(f"global id {i} is not a {modality} id [{off}, {off + n})")
        return [i - off for i in ids]

    def modality_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Modality index of every global id (specials -> 0, the text modality). Vectorised.

        Args:
            ids: int64 tensor of global ids, any shape.

        Returns:
            int64 tensor of the same shape with modality indices.
        """
        boundaries = self._boundaries.to(ids.device)
        return torch.bucketize(ids, boundaries, right=True)

    # ---- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (enough to rebuild the vocab and check its special layout)."""
        return {
            "modality_sizes": dict(self.modality_sizes),
            "special_tokens": list(SPECIAL_TOKENS),
            "num_special_slots": NUM_SPECIAL_SLOTS,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnifiedVocab:
        """Inverse of :meth:`to_dict`; rejects a dict written with a different special layout."""
        if (
            list(d.get("special_tokens", SPECIAL_TOKENS)) != list(SPECIAL_TOKENS)
            or int(d.get("num_special_slots", NUM_SPECIAL_SLOTS)) != NUM_SPECIAL_SLOTS
        ):
            raise ValueError("vocab dict was written with a different special-token layout")
        return cls({str(k): int(v) for k, v in d["modality_sizes"].items()})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UnifiedVocab):
            return NotImplemented
        return list(self.modality_sizes.items()) == list(other.modality_sizes.items())

    def __hash__(self) -> int:
        return hash(tuple(self.modality_sizes.items()))

    def __repr__(self) -> str:
        return f"UnifiedVocab({self.modality_sizes}, size={self.size})"

    def _check(self, modality: str) -> None:
        if modality not in self._offsets:
            raise ValueError(f"unknown modality {modality!r}; vocab has {self.modalities}")
