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

Bidirectional spans (Transfusion image patches, ``span_BT``) add the pairs above the diagonal
inside each span: s * (s - 1) / 2 per span of s positions (:func:`span_pairs`).

Continuous image patches (Transfusion, ``num_patches`` > 0): the linear patch embedder (patch
linear and timestep MLP) and the patch head cost 2 * their matmul parameters per patch; the U-Net
patch layers cost their convolutions and linears per image (``nn/unet_patch.py:
unet_flops_per_image``); the LM head runs on the other positions only (N - patches).

Sparse layers count only the tokens actually processed (pass the plan's per-tower counts):

- FFN expert group of n_g tokens and E_g experts: expert choice ``E_g * k_g`` expert-token pairs
  (k_g = ceil(n_g * capacity / E_g)), token choice ``top_k * n_g``, a plain group n_g; each pair
  costs 2 * 3 * D * F, plus the router 2 * D * E_g * n_g;
- Mixture-of-Depths layer: the router 2 * D * N, then attention projections and FFN for the
  selected tokens only (per-row selection: k = ceil(capacity * T) of every row, n = B * k;
  batch selection: n = ceil(capacity * N)); attention over the pairs the selected tokens
  actually attended (causal, in-document among the selected: the model reports them per layer
  as ``mod/<site>/pairs`` and the trainer passes them in as ``mod_pairs``), P * (n / N)^2 in
  expectation when they are not given, and B * k^2 (or n^2) with ``dense_attention``. The
  selected tokens' per-tower split is estimated proportionally (exact when the towers' shares
  are kept; it only moves FLOPs between groups of equal cost except through the rounding of k).

Shape legend: B = batch rows, T = sequence length.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from sparsefusion.models.transformer import ModelConfig
from sparsefusion.nn.mod import mod_capacity
from sparsefusion.nn.moe import expert_capacity
from sparsefusion.nn.unet_patch import unet_flops_per_image


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


def span_pairs(span_BT: torch.Tensor | None) -> int:
    """Extra (query, key) pairs of bidirectional spans: s * (s - 1) / 2 per span of length s.

    Args:
        span_BT: span id per position (-1 = none; ids distinct within a row), or None.
    """
    if span_BT is None:
        return 0
    span_BT = span_BT.detach().cpu().long()
    B = span_BT.shape[0]
    ids_N = (span_BT + 1 + torch.arange(B)[:, None] * (int(span_BT.max()) + 2)).reshape(-1)
    ids_N = ids_N[span_BT.reshape(-1) >= 0]
    if ids_N.numel() == 0:
        return 0
    sizes = torch.bincount(ids_N)
    return int((sizes * (sizes - 1) // 2).sum())


def patch_flops(cfg: ModelConfig, num_patches: int) -> int:
    """Forward FLOPs of the patch embedder and head for ``num_patches`` patches, minus the LM
    head they skip (Transfusion)."""
    if not num_patches or not cfg.patch_dim:
        return 0
    D, C, F = cfg.dim, cfg.patch_dim, 128  # F: PatchEmbed's default timestep features
    lm_head = num_patches * 2 * D * cfg.vocab_size
    if cfg.patch_layers == "unet":
        shape = cfg.unet_shape()
        return num_patches // shape.patches_per_image * unet_flops_per_image(shape) - lm_head
    embed = 2 * (C * D + F * D + D * D)
    head = 2 * D * C
    return num_patches * (embed + head) - lm_head


def forward_flops(
    cfg: ModelConfig,
    document_BT: torch.Tensor,
    *,
    dense_attention: bool = False,
    tower_counts: tuple[int, ...] | None = None,
    mod_pairs: dict[int, float] | None = None,
    span_BT: torch.Tensor | None = None,
    num_patches: int = 0,
) -> int:
    """Forward FLOPs of one batch (see the module docstring).

    Args:
        cfg: the model config.
        document_BT: the batch's document ids (host tensor).
        dense_attention: count attention over every pair the dense mask computes.
        tower_counts: tokens per tower (``plan.counts``); needed when the FFN has per-tower
            expert groups.
        mod_pairs: routed layer -> the (query, key) pairs its selected tokens attended, as the
            model reports them (``mod/<site>/pairs``); without it the expected number under
            uniform selection is used.
        span_BT: bidirectional span ids (their extra pairs are counted), or None.
        num_patches: continuous patches in the batch (patch layers; LM head skipped there).

    Returns:
        FLOPs as an int.
    """
    B, T = document_BT.shape
    N = B * T
    pairs = attended_pairs(document_BT, dense_attention=dense_attention)
    if not dense_attention:
        pairs += span_pairs(span_BT)
    extra = patch_flops(cfg, num_patches)
    if not cfg.has_experts and not cfg.mod.enabled:
        attention = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * pairs
        return 2 * active_params_per_token(cfg) * N + attention + extra
    counts = _group_counts(cfg, N, tower_counts)
    routed = set(cfg.mod.routed_layers(cfg.num_layers))
    total = 2 * cfg.dim * cfg.vocab_size * N
    for layer in range(cfg.num_layers):
        n, layer_counts, layer_pairs = N, counts, pairs
        if layer in routed:
            n, layer_pairs = mod_subset(cfg, B, T, pairs, dense_attention)
            if mod_pairs is not None and layer in mod_pairs and not dense_attention:
                layer_pairs = mod_pairs[layer]
            layer_counts = _proportional(counts, n)
            total += 2 * cfg.dim * N
        total += 2 * _attention_params(cfg) * n
        total += round(4 * cfg.num_heads * cfg.head_dim * layer_pairs)
        total += _ffn_flops(cfg, layer_counts)
    return total + extra


def mod_subset(cfg: ModelConfig, B: int, T: int, pairs: int, dense_attention: bool):
    """Tokens a routed MoD layer processes and its (expected) attended pairs.

    Per-row selection keeps ``k = ceil(c * T)`` tokens of every row and attends (B, k) rows;
    batch selection keeps ``ceil(c * B * T)`` tokens as one row. A pair survives when both of
    its tokens are selected: ``pairs * (n / N)^2`` in expectation.
    """
    N = B * T
    if cfg.mod.selection == "row":
        k = mod_capacity(T, cfg.mod.capacity)
        n, dense_pairs = B * k, B * k * k
    else:
        n = mod_capacity(N, cfg.mod.capacity)
        dense_pairs = n * n
    return n, dense_pairs if dense_attention else pairs * (n / N) ** 2


def _attention_params(cfg: ModelConfig) -> int:
    return layer_matmul_params(cfg) - 3 * cfg.dim * cfg.hidden_dim


def _group_counts(cfg: ModelConfig, N: int, tower_counts: tuple[int, ...] | None) -> list[int]:
    groups = len(cfg.ffn_group_names) if cfg.has_experts else 1
    if groups == 1:
        return [N]
    if tower_counts is None or len(tower_counts) != groups or sum(tower_counts) != N:
        raise ValueError(f"FLOPs of per-tower expert groups need tower_counts, got {tower_counts}")
    return list(tower_counts)


def _proportional(counts: list[int], n: int) -> list[int]:
    """Split n like ``counts`` (largest remainders), summing exactly to n."""
    total = max(1, sum(counts))
    exact = [c * n / total for c in counts]
    out = [int(e) for e in exact]
    order = sorted(range(len(counts)), key=lambda i: exact[i] - out[i], reverse=True)
    for i in order[: n - sum(out)]:
        out[i] += 1
    return out


def _ffn_flops(cfg: ModelConfig, counts: list[int]) -> int:
    per_pair = 2 * 3 * cfg.dim * cfg.hidden_dim
    if not cfg.has_experts:
        return per_pair * sum(counts)
    total = 0
    for n_g, e_g in zip(counts, cfg.experts_per_group, strict=True):
        if not cfg.moe.is_routed(e_g):
            total += per_pair * n_g
        elif cfg.moe.router == "token_choice":
            total += per_pair * n_g * min(cfg.moe.top_k, e_g) + 2 * cfg.dim * e_g * n_g
        else:
            k = expert_capacity(n_g, e_g, cfg.moe.capacity)
            total += per_pair * e_g * k + 2 * cfg.dim * e_g * n_g
    return total


def train_flops(
    cfg: ModelConfig,
    document_BT: torch.Tensor,
    *,
    dense_attention: bool = False,
    tower_counts: tuple[int, ...] | None = None,
    mod_pairs: dict[int, float] | None = None,
    span_BT: torch.Tensor | None = None,
    num_patches: int = 0,
) -> int:
    """Training (forward + backward) FLOPs of one batch: 3 x :func:`forward_flops`.

    Args:
        cfg: the model config.
        document_BT: the batch's document ids (host tensor).
        dense_attention: count attention over all B * T * T pairs (matches a FLOP counter on
            dense-mask SDPA) instead of the causal in-document pairs actually needed.
        tower_counts: tokens per tower (``plan.counts``), for per-tower expert groups.
        mod_pairs: attended pairs of each routed MoD layer (see :func:`forward_flops`).
        span_BT: bidirectional span ids (Transfusion image patches), or None.
        num_patches: continuous patches in the batch.

    Returns:
        Total FLOPs as an int.
    """
    return 3 * forward_flops(
        cfg,
        document_BT,
        dense_attention=dense_attention,
        tower_counts=tower_counts,
        mod_pairs=mod_pairs,
        span_BT=span_BT,
        num_patches=num_patches,
    )


def mod_matched_capacity(
    dense: ModelConfig, mod: ModelConfig, *, seq_len: int, doc_len: int, tower_share: list[float]
) -> float:
    """The MoD capacity at which ``mod`` costs what ``dense`` costs, attention included.

    MoMa restores the compute of MoD by adding layers at a fixed capacity (25%); with whole
    layers that lands a few percent off, and more so once attention is counted (a routed layer
    keeps ``c`` of the projections but only about ``c^2`` of the attention pairs). This solves
    for the capacity (bisection on :func:`forward_flops`, expected pairs) that matches the
    forward FLOPs of ``dense`` exactly for rows of ``seq_len`` tokens in documents of ``doc_len``
    tokens, with the towers' token shares ``tower_share``.

    Returns:
        The capacity in (0, 1] (``mod.mod.capacity`` unchanged if no capacity can match).
    """
    document_1T = (torch.arange(seq_len) // max(1, doc_len))[None]
    counts = _proportional([round(1000 * s) for s in tower_share], seq_len)
    groups = len(mod.ffn_group_names) if mod.has_experts else 1
    towers = tuple(counts) if groups > 1 else None
    dense_towers = tuple(counts) if dense.has_experts and len(dense.ffn_group_names) > 1 else None
    target = forward_flops(dense, document_1T, tower_counts=dense_towers)

    def cost(c: float) -> int:
        return forward_flops(
            replace(mod, mod=replace(mod.mod, capacity=c)), document_1T, tower_counts=towers
        )

    lo, hi = 1.0 / seq_len, 1.0
    if not cost(lo) <= target <= cost(hi):
        return mod.mod.capacity
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) < target else (lo, mid)
    return round(hi, 4)


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
