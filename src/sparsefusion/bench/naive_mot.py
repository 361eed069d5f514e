"""Mixture-of-Transformers written the way the official tutorial does it, for the benchmark.

Same parameters and the same function as :class:`~sparsefusion.models.transformer.Transformer`,
but every per-tower operation selects its tokens with a boolean mask (``x[mask]``) and merges
the results with ``index_put`` into a fresh tensor, in the original token order, layer after
layer. Boolean-mask indexing has a data-dependent shape, so on a GPU every one of these ops
waits for the device (a host sync) and ``torch.compile`` cannot capture it in one graph. It
exists only to show what the routing plan and grouped matmuls buy.

Shape legend: B = batch rows, T = sequence length, N = B*T, D = width, H/J/K = heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsefusion.models.inputs import ForwardContext, ModelInputs
from sparsefusion.models.transformer import ModelOutput, Transformer
from sparsefusion.nn.attention import sdpa
from sparsefusion.nn.rope import apply_rope, rope_angles


class NaiveMoT(nn.Module):
    """Boolean-mask execution of a :class:`Transformer`'s weights (no routing plan).

    Args:
        model: the model whose parameters are used (shared, not copied).
    """

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, inputs: ModelInputs, ctx: ForwardContext | None = None) -> ModelOutput:
        """Logits in original order; each position's tower is read from ``inputs.plan``."""
        m, cfg = self.model, self.model.cfg
        B, T = inputs.shape
        masks = [(inputs.plan.group_N == g) for g in range(cfg.num_towers)]
        mask = m.attention_mask(inputs.document_BT)
        rope = rope_angles(inputs.position_BT, cfg.head_dim, cfg.rope_theta)
        x_ND = m.embedding(inputs.tokens_BT).view(B * T, -1)
        for layer in m.layers:
            x_ND = _block(layer, x_ND, masks, mask, rope, B, T)
        logits_NV = m.output(m.norm(x_ND))
        return ModelOutput(logits_BTV=logits_NV.view(B, T, -1))


def _per_tower(fn, x_NI: torch.Tensor, masks: list[torch.Tensor], out_dim: int) -> torch.Tensor:
    """Apply ``fn(x_subset, tower)`` per tower with boolean masks, merging with index_put."""
    out_NO = x_NI.new_zeros(x_NI.shape[0], out_dim)
    for g, mask_N in enumerate(masks):
        out_NO = out_NO.index_put((mask_N,), fn(x_NI[mask_N], g))
    return out_NO


def _linear(tl, x_NI: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    w_GOI = tl.weight
    if w_GOI.shape[0] == 1:
        return F.linear(x_NI, w_GOI[0])
    return _per_tower(lambda x, g: F.linear(x, w_GOI[g]), x_NI, masks, w_GOI.shape[1])


def _norm(norm, x_ND: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    def one(x: torch.Tensor, g: int) -> torch.Tensor:
        y = F.rms_norm(x.float(), (norm.dim,), eps=norm.eps) * norm.weight[g].float()
        return y.type_as(x)

    if norm.num_towers == 1:
        return one(x_ND, 0)
    shape = x_ND.shape
    flat = x_ND.reshape(shape[0], -1)
    out = _per_tower(
        lambda x, g: one(x.view(-1, *shape[1:]), g).reshape(x.shape[0], -1),
        flat,
        masks,
        flat.shape[1],
    )
    return out.view(shape)


def _attention(attn, x_ND, masks, mask, rope, B: int, T: int) -> torch.Tensor:
    H, J, K = attn.num_heads, attn.num_kv_heads, attn.head_dim
    qkv_NX = _linear(attn.wqkv, x_ND, masks)
    q_NHK = qkv_NX[:, : H * K].reshape(-1, H, K)
    k_NJK = qkv_NX[:, H * K : (H + J) * K].reshape(-1, J, K)
    v_NJK = qkv_NX[:, (H + J) * K :].reshape(-1, J, K)
    if attn.q_norm is not None:
        q_NHK, k_NJK = _norm(attn.q_norm, q_NHK, masks), _norm(attn.k_norm, k_NJK, masks)
    q_BTHK = apply_rope(q_NHK.view(B, T, H, K), rope)
    k_BTJK = apply_rope(k_NJK.view(B, T, J, K), rope)
    o_BHTK = sdpa(
        q_BTHK.transpose(1, 2), k_BTJK.transpose(1, 2), v_NJK.view(B, T, J, K).transpose(1, 2), mask
    )
    return _linear(attn.wo, o_BHTK.transpose(1, 2).reshape(B * T, H * K), masks)


def _ffn(ffn, x_ND, masks) -> torch.Tensor:
    gate_NF, up_NF = _linear(ffn.w13, x_ND, masks).chunk(2, dim=-1)
    return _linear(ffn.w2, F.silu(gate_NF) * up_NF, masks)


def _block(layer, x_ND, masks, mask, rope, B: int, T: int) -> torch.Tensor:
    if layer.post_norm:
        h = x_ND + _norm(
            layer.attention_norm, _attention(layer.attention, x_ND, masks, mask, rope, B, T), masks
        )
        return h + _norm(layer.ffn_norm, _ffn(layer.feed_forward, h, masks), masks)
    a = _attention(
        layer.attention, _norm(layer.attention_norm, x_ND, masks), masks, mask, rope, B, T
    )
    h = x_ND + a
    return h + _ffn(layer.feed_forward, _norm(layer.ffn_norm, h, masks), masks)
