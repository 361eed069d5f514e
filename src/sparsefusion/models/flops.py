"""Analytic FLOPs and parameter counts (for MFU, FLOPs matching and reports).

Training FLOPs of one batch = 3 x forward (backward = 2 x forward: grads w.r.t. inputs and weights).

Forward FLOPs = 2 * A * N + L * 4 * H * K * P, where

- A = active matmul parameters per token (:func:`active_params_per_token`): per layer the ONE
  tower a token runs through (Q, K, V, O and the three SwiGLU matrices) plus the LM head D * V;
  embedding lookups, norms, RoPE and softmax count 0. MoT therefore costs what dense costs;
- N = B * T tokens of the batch (padding included: it is computed);
- L = layers, H = query heads, K = head dim (QK^T and AV are 2 * K FLOPs per (query, key) pair
  and head each);
- P = attended (query, key) pairs: per row and per document of length l, l * (l + 1) / 2
  (causal within documents), or B * T * T with ``dense_attention=True`` (what a dense-mask SDPA
  actually computes, and what ``torch.utils.flop_counter`` counts).

Bidirectional spans are not counted separately (they add at most span_len^2 / 2 pairs each).

Shape legend: B = batch rows, T = sequence length.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsefusion.models.transformer import ModelConfig


def layer_matmul_params(cfg: ModelConfig) -> int:
    """Matmul parameters of one layer for one tower (Q, K, V, O and the SwiGLU FFN)."""
    attention = cfg.dim * (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim
    attention += cfg.num_heads * cfg.head_dim * cfg.dim
    return attention + 3 * cfg.dim * cfg.hidden_dim


def active_params_per_token(cfg: ModelConfig) -> int:
    """Matmul parameters one token passes through: L one-tower layers plus the LM head.

    Args:
        cfg: the model config (vocab_size must be set for the head to count).

    Returns:
        The count (embedding table and norms excluded).
    """
    return cfg.num_layers * layer_matmul_params(cfg) + cfg.dim * cfg.vocab_size


def attended_pairs(document_BT: torch.Tensor, *, dense_attention: bool = False) -> int:
    """Number of (query, key) pairs attention evaluates for one batch.

    Args:
        document_BT: document index of each position (host tensor; documents are contiguous).
        dense_attention: count every pair of a row (B * T * T) instead of causal in-document ones.

    Returns:
        P, summed over rows.
    """
    B, T = document_BT.shape
    if dense_attention:
        return B * T * T
    document_BT = document_BT.detach().cpu().long()
    # Offset every row's ids so that runs never continue across a row boundary.
    row_B1 = torch.arange(B)[:, None] * (int(document_BT.max()) + 1)
    _, lengths = torch.unique_consecutive((document_BT + row_B1).reshape(-1), return_counts=True)
    return int((lengths * (lengths + 1) // 2).sum())


def forward_flops(
    cfg: ModelConfig, document_BT: torch.Tensor, *, dense_attention: bool = False
) -> int:
    """Forward FLOPs of one batch: 2 * A * N + L * 4 * H * K * P (see the module docstring)."""
    num_tokens = document_BT.numel()
    pairs = attended_pairs(document_BT, dense_attention=dense_attention)
    attention = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * pairs
    return 2 * active_params_per_token(cfg) * num_tokens + attention


def train_flops(
    cfg: ModelConfig, document_BT: torch.Tensor, *, dense_attention: bool = False
) -> int:
    """Training (forward + backward) FLOPs of one batch: 3 x :func:`forward_flops`.

    Args:
        cfg: the model config.
        document_BT: the batch's document ids (host tensor).
        dense_attention: count attention over all B * T * T pairs (matches a FLOP counter on
            dense-mask SDPA) instead of the causal in-document pairs actually needed.

    Returns:
        Total FLOPs as an int.
    """
    return 3 * forward_flops(cfg, document_BT, dense_attention=dense_attention)


def num_params(model: nn.Module, *, exclude_embedding: bool = False) -> int:
    """Number of parameters (each shared tensor once).

    Args:
        model: any module.
        exclude_embedding: leave out ``nn.Embedding``-like tables (modules named ``embedding``).

    Returns:
        The count.
    """
    params = dict(model.named_parameters())
    if exclude_embedding:
        params = {k: v for k, v in params.items() if not k.split(".")[0] == "embedding"}
    return sum(p.numel() for p in params.values())
