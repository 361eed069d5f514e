"""Tokenizer protocols shared by the data pipeline and the generators."""

from __future__ import annotations

from typing import Protocol

import torch
from PIL import Image


class TextTokenizer(Protocol):
    """Text to local ids in ``[0, vocab_size)``."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ImageTokenizer(Protocol):
    """RGB images to discrete codes in ``[0, codebook_size)``, ``tokens_per_image`` per image."""

    codebook_size: int
    tokens_per_image: int
    image_size: int

    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        """Returns int64 codes of shape (N, tokens_per_image), raster order."""
        ...

    def decode(self, codes_NL: torch.Tensor) -> list[Image.Image]: ...
