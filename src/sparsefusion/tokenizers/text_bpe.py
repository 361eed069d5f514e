"""Byte-level BPE text tokenizer on top of Hugging Face ``tokenizers``.

Byte-level pre-tokenization and decoding make ``decode(encode(s)) == s`` for every string, unicode
included. The BPE holds no special tokens: the unified vocabulary (``vocab.py``) owns them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from sparsefusion.data.text import text_problem
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

NUM_BYTES = 256


def _check(text: str) -> None:
    problem = text_problem(text) if isinstance(text, str) else f"text is {type(text).__name__}"
    if problem is not None:
        raise ValueError(problem)


class BPETextTokenizer:
    """Byte-level BPE: text <-> local ids in ``[0, vocab_size)``.

    Args:
        tokenizer: a Hugging Face ``Tokenizer`` with a BPE model and byte-level pre-tokenizer and
            decoder (use :meth:`train` or :meth:`load` rather than building one by hand).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETextTokenizer:
        """Train a byte-level BPE.

        Args:
            texts: training strings.
            vocab_size: target size including the 256 byte symbols (the result may be smaller when
                the corpus has too few distinct merges).

        Returns:
            The trained tokenizer.
        """
        if vocab_size < NUM_BYTES:
            raise ValueError(
                f"vocab_size must be >= {NUM_BYTES} (one id per byte), got {vocab_size}"
            )
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=[],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        """Text -> local ids.

        Raises:
            ValueError: for text breaking the text rule (``data/text.py``: a lone surrogate).
        """
        _check(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts -> local ids (parallel inside ``tokenizers``; raises as :meth:`encode`)."""
        for text in texts:
            _check(text)
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Local ids -> text (an incomplete UTF-8 sequence decodes to U+FFFD, never raises)."""
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"text id {i} outside [0, {self.vocab_size})")
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        """The tokenizer as a JSON string (Hugging Face format)."""
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text: str) -> BPETextTokenizer:
        """Inverse of :meth:`to_json`."""
        return cls(Tokenizer.from_str(text))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer JSON to ``path``."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BPETextTokenizer:
        """Read a tokenizer JSON written by :meth:`save`.

        Raises:
            ValueError: when the file is not a byte-level BPE tokenizer JSON.
        """
        text = Path(path).read_text(encoding="utf-8")
        try:
            spec = json.loads(text)
            if spec["model"]["type"] != "BPE":
                raise ValueError(f"expected a BPE model, got {spec['model']['type']!r}")
            return cls.from_json(text)
        except Exception as e:  # json, key or tokenizers parse errors
            raise ValueError(f"{path}: not a valid BPE tokenizer file ({e})") from e
