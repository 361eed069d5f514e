"""Self-attention with per-tower projections and the per-batch attention mask.

Q/K/V and O are :class:`TowerLinear` layers applied in plan-sorted order; the attention itself
runs over the whole interleaved sequence in original order (one softmax over all modalities).
The mask is built once per batch and shared by all layers: attention stays inside a document,
is causal, and is bidirectional inside a span (Transfusion image spans, arXiv 2408.11039).
Two backends share that rule: SDPA with a dense boolean mask (works everywhere, forward and
backward) and FlexAttention with one block mask per batch (sparse blocks are skipped; compiled on
GPU; on CPU torch 2.13 has its forward only, so CPU training uses SDPA).

Shape legend: B = batch rows, T = sequence length (queries and keys), N = B*T flattened
positions, D = model width, H = query heads, J = key/value heads, K = head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from sparsefusion.nn.norms import TowerRMSNorm
from sparsefusion.nn.rope import RopeAngles, apply_rope
from sparsefusion.nn.routing import RoutingPlan
from sparsefusion.nn.tower_linear import LinearImpl, TowerLinear


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may attend to, for one batch.

    Exactly one of the three forms is set.

    Attributes:
        allowed_B1TT: dense boolean mask for SDPA (True = may attend).
        is_causal: plain causal attention over the whole row (SDPA's flash fast path).
        block_mask: FlexAttention block mask of the same rule (built once per batch).
    """

    allowed_B1TT: torch.Tensor | None = None
    is_causal: bool = False
    block_mask: BlockMask | None = None

    def __post_init__(self) -> None:
        forms = (self.allowed_B1TT is not None) + self.is_causal + (self.block_mask is not None)
        if forms != 1:
            raise ValueError(
                "AttentionMask needs exactly one of allowed_B1TT, is_causal=True or block_mask"
            )

    @classmethod
    def causal(cls) -> AttentionMask:
        """Causal attention over each full row (one document per row, no spans)."""
        return cls(is_causal=True)


AttentionBackend = Literal["sdpa", "flex"]


class KVStep(Protocol):
    """One layer's KV cache bound to the tokens of one incremental forward (``generate/``).

    The model only reads and fills it: :meth:`attend` writes the step's keys/values (after the
    projections, QK-norm and RoPE) into the cache and attends over the cached prefix plus the
    step; :meth:`rebind` gives the same layer's cache for a subset of the step's tokens (a
    Mixture-of-Depths layer caches only the tokens it processes).
    """

    def attend(
        self, q_BHTK: torch.Tensor, k_BJTK: torch.Tensor, v_BJTK: torch.Tensor
    ) -> torch.Tensor:
        """Attention output (B, H, T, K) of the step's queries over cache + step."""
        ...

    def rebind(
        self, document_BT: torch.Tensor, span_BT: torch.Tensor | None, counts: list[int]
    ) -> KVStep:
        """The view for other tokens: ``counts[b]`` valid tokens lead row b (host ints)."""
        ...

    def gated(self, keep_BT: torch.Tensor) -> KVStep:
        """The same tokens, of which this layer keeps only ``keep_BT`` (device bool, (B, T))."""
        ...

    def real_BT(self) -> torch.Tensor:
        """True at the step's real tokens (False at filler, e.g. right padding)."""
        ...


def build_attention_mask(
    document_BT: torch.Tensor,
    span_BT: torch.Tensor | None = None,
    backend: AttentionBackend = "sdpa",
) -> AttentionMask:
    """Build the document-causal mask with optional bidirectional spans.

    Allowed(q, k) = same document AND (k <= q OR span[q] == span[k] >= 0).

    Args:
        document_BT: document index of each position inside its row.
        span_BT: span id of each position (-1 = not in a span); positions of one span see each
            other in both directions. Span ids only need to be distinct within a document.
        backend: "sdpa" (dense boolean mask, (B, 1, T, T)) or "flex" (a FlexAttention block
            mask over the same rule).

    Returns:
        The batch's mask.
    """
    if span_BT is not None and span_BT.shape != document_BT.shape:
        raise ValueError(
            f"span_BT {tuple(span_BT.shape)} != document_BT {tuple(document_BT.shape)}"
        )
    if backend == "flex":
        return AttentionMask(block_mask=_flex_block_mask(document_BT, span_BT))
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}; expected 'sdpa' or 'flex'")
    T = document_BT.shape[1]
    idx_T = torch.arange(T, device=document_BT.device)
    causal_TT = idx_T[None, :] <= idx_T[:, None]  # [q, k]: k <= q
    same_doc_BTT = document_BT[:, :, None] == document_BT[:, None, :]
    visible_BTT = causal_TT[None]
    if span_BT is not None:
        same_span_BTT = (span_BT[:, :, None] == span_BT[:, None, :]) & (span_BT >= 0)[:, :, None]
        visible_BTT = visible_BTT | same_span_BTT
    return AttentionMask(allowed_B1TT=(same_doc_BTT & visible_BTT).unsqueeze(1))


def _flex_block_mask(document_BT: torch.Tensor, span_BT: torch.Tensor | None) -> BlockMask:
    """The FlexAttention form of the document-causal-span rule (same as the dense mask)."""
    B, T = document_BT.shape

    def mask_mod(b, h, q, k):
        visible = k <= q
        if span_BT is not None:
            same_span = (span_BT[b, q] == span_BT[b, k]) & (span_BT[b, q] >= 0)
            visible = visible | same_span
        return (document_BT[b, q] == document_BT[b, k]) & visible

    on_gpu = document_BT.device.type == "cuda"
    return create_block_mask(mask_mod, B, None, T, T, device=document_BT.device, _compile=on_gpu)


@cache
def _compiled_flex():
    """FlexAttention compiled once (eager flex materialises the full score matrix)."""
    return torch.compile(flex_attention, dynamic=False)


def flex(
    q_BHTK: torch.Tensor, k_BJTK: torch.Tensor, v_BJTK: torch.Tensor, block_mask: BlockMask
) -> torch.Tensor:
    """FlexAttention under a block mask: compiled on GPU, eager elsewhere (CPU: forward only)."""
    fn = _compiled_flex() if q_BHTK.device.type == "cuda" else flex_attention
    return fn(
        q_BHTK, k_BJTK, v_BJTK, block_mask=block_mask, enable_gqa=k_BJTK.shape[1] != q_BHTK.shape[1]
    )


def sdpa(
    q_BHTK: torch.Tensor, k_BJTK: torch.Tensor, v_BJTK: torch.Tensor, mask: AttentionMask
) -> torch.Tensor:
    """Attention under an :class:`AttentionMask` (GQA when J < H); flex for a block mask."""
    if mask.block_mask is not None:
        return flex(q_BHTK, k_BJTK, v_BJTK, mask.block_mask)
    return F.scaled_dot_product_attention(
        q_BHTK,
        k_BJTK,
        v_BJTK,
        attn_mask=mask.allowed_B1TT,
        is_causal=mask.is_causal,
        enable_gqa=k_BJTK.shape[1] != q_BHTK.shape[1],
    )


class TowerAttention(nn.Module):
    """Multi-head (grouped-query) self-attention with per-tower Q/K/V/O and QK-norm.

    Args:
        dim: model width D.
        num_heads: query heads H.
        num_kv_heads: key/value heads J (divides H).
        num_towers: towers of the Q/K/V/O projections (1 = shared).
        qk_norm: apply RMSNorm over the head dim to queries and keys, before RoPE.
        qk_norm_towers: towers of the QK-norm weights (1 = shared).
        norm_eps: epsilon of the QK-norm.
        impl: TowerLinear implementation.
        qkv_bias: a bias on the Q/K/V projections (Qwen2); O stays bias-free.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        num_towers: int = 1,
        qk_norm: bool = True,
        qk_norm_towers: int = 1,
        norm_eps: float = 1e-5,
        impl: LinearImpl = "grouped",
        qkv_bias: bool = False,
    ):
        super().__init__()
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"bad heads: dim={dim}, heads={num_heads}, kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        qkv_dim = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.wqkv = TowerLinear(dim, qkv_dim, num_towers, impl, bias=qkv_bias)
        self.wo = TowerLinear(num_heads * self.head_dim, dim, num_towers, impl)
        self.q_norm = TowerRMSNorm(self.head_dim, qk_norm_towers, norm_eps) if qk_norm else None
        self.k_norm = TowerRMSNorm(self.head_dim, qk_norm_towers, norm_eps) if qk_norm else None

    def init_weights(self, std: float, out_std: float) -> None:
        """Normal init for Q/K/V (``std``) and O (``out_std``); ones for the QK-norms."""
        self.wqkv.init_weights(std)
        self.wo.init_weights(out_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.init_weights()

    def forward(
        self,
        x_ND: torch.Tensor,
        *,
        plan: RoutingPlan,
        mask: AttentionMask | None,
        rope: RopeAngles,
        kv: KVStep | None = None,
    ) -> torch.Tensor:
        """Attend over the whole row; inputs and outputs are in plan-sorted order.

        Args:
            x_ND: hidden states, plan-sorted.
            plan: the tower routing plan of the batch.
            mask: the batch's attention mask (unused, may be None, when ``kv`` is given).
            rope: the batch's RoPE angles (their shape gives B and T).
            kv: a KV cache step (incremental decoding): keys and values go into the cache and
                the queries attend over the cached prefix and the step.

        Returns:
            The attention output after the O projection, plan-sorted, (N, D).
        """
        B, T = rope.cos_BTF.shape[:2]
        H, J, K = self.num_heads, self.num_kv_heads, self.head_dim
        qkv_NX = self.wqkv(x_ND, plan)
        q_NHK = qkv_NX[:, : H * K].view(-1, H, K)
        k_NJK = qkv_NX[:, H * K : (H + J) * K].view(-1, J, K)
        v_NJK = qkv_NX[:, (H + J) * K :].view(-1, J, K)
        if self.q_norm is not None and self.k_norm is not None:
            q_NHK, k_NJK = self.q_norm(q_NHK, plan), self.k_norm(k_NJK, plan)
        # Back to original order for RoPE and attention (one gather per tensor).
        q_BTHK = apply_rope(plan.unsort(q_NHK).view(B, T, H, K), rope)
        k_BTJK = apply_rope(plan.unsort(k_NJK).view(B, T, J, K), rope)
        v_BTJK = plan.unsort(v_NJK).view(B, T, J, K)
        q_BHTK, k_BJTK, v_BJTK = (t.transpose(1, 2) for t in (q_BTHK, k_BTJK, v_BTJK))
        if kv is not None:
            o_BHTK = kv.attend(q_BHTK, k_BJTK, v_BJTK)
        elif mask is None:
            raise ValueError("TowerAttention needs a mask or a KV cache step")
        else:
            o_BHTK = sdpa(q_BHTK, k_BJTK, v_BJTK, mask)
        o_NX = plan.sort(o_BHTK.transpose(1, 2).reshape(B * T, H * K))
        return self.wo(o_NX, plan)
