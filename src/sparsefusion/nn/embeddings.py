"""Unified-vocabulary token embedding and output head (bias-free; untied by default).

One table holds every modality's discrete ids (text BPE, image VQ codes, speech units, sentinels),
so the lookup needs no routing. The output head is a separate (V, D) matrix, or (tied, as in the
small Qwen2 models) the embedding table itself: :class:`TiedOutputHead` owns no parameter, so the
state dict holds the table once.

Shape legend: B = batch rows, T = sequence length, N = flattened positions, D = model width,
V = vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenEmbedding(nn.Module):
    """Embedding table shared by all modalities.

    Args:
        vocab_size: V, the unified vocabulary size.
        dim: model width D.
    """

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size, self.dim = vocab_size, dim
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))  # (V, D)

    def init_weights(self, std: float) -> None:
        """Draw the table from N(0, std^2)."""
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Look up ids (any shape) and return their vectors, shape ``tokens.shape + (D,)``."""
        return F.embedding(tokens_BT, self.weight)


class OutputHead(nn.Module):
    """Bias-free projection from the model width to unified-vocabulary logits.

    Args:
        dim: model width D.
        vocab_size: V.
    """

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))  # (V, D)

    def init_weights(self, std: float) -> None:
        """Draw the head from N(0, std^2)."""
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Project hidden states to logits, (..., D) -> (..., V)."""
        return F.linear(x_ND, self.weight)


class TiedOutputHead(nn.Module):
    """Output head that reads the embedding table (tied weights; no parameter of its own).

    The embedding module is held outside the module tree, so the table appears once in
    ``state_dict()`` and ``parameters()``; ``weight`` always reads the table's current tensor
    (after ``to()``, ``to_empty()`` or FSDP's swaps).

    Args:
        embedding: the model's token embedding.
    """

    def __init__(self, embedding: TokenEmbedding):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # not a submodule

    @property
    def weight(self) -> torch.Tensor:
        """The (V, D) embedding table."""
        return self._embedding.weight

    def init_weights(self, std: float) -> None:
        """Nothing to initialise (the embedding owns the table)."""

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Project hidden states to logits with the embedding table, (..., D) -> (..., V)."""
        return F.linear(x_ND, self.weight)
