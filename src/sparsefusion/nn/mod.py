"""Mixture-of-Depths (arXiv 2404.02258; MoMa's MoD, arXiv 2407.21770 section 2.3).

At a routed layer a router ``r = sigmoid(w . x)`` scores every position; the top
``k = max(1, ceil(capacity * N))`` of ALL N = B*T positions of the batch are selected (before the
modality split). The selected tokens run the whole block (attention among themselves only, and
the FFN / expert groups) with their ORIGINAL positions (RoPE), documents and causal order; the
block's delta is scaled by the gate and added once: ``x_i + r_i * (block(X_sel)_i - x_i)``.
Unselected tokens skip the block. The gate puts the router on the gradient path.

The subset needs its own routing plan (its per-tower counts). Those counts come from device
indices, so building the sub-plan costs ONE device-to-host sync per MoD layer (documented
exception to the no-sync rule). In causal mode the selection is ``aux(x) > 0.5`` per token, so
k is data-dependent (another sync; inference only).

Shape legend: B = batch rows, T = sequence length, N = B*T positions, K = selected positions,
D = model width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsefusion.nn.attention import build_attention_mask
from sparsefusion.nn.rope import rope_angles
from sparsefusion.nn.routing import RoutingPlan
from sparsefusion.nn.routing_context import RoutingContext


@dataclass(kw_only=True)
class MoDConfig:
    """Mixture-of-Depths settings (``model.mod.*``).

    Attributes:
        enabled: wrap the routed layers in a MoD router.
        interval: route every ``interval``-th layer (MoMa: 2).
        first_layer: the first routed layer (MoMa: 0); routed = first_layer, +interval, ...
        capacity: fraction of the batch's positions a routed layer processes, in (0, 1]
            (MoMa: 0.25).
    """

    enabled: bool = False
    interval: int = 2
    first_layer: int = 0
    capacity: float = 0.25

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"model.mod.interval must be >= 1, got {self.interval}")
        if self.first_layer < 0:
            raise ValueError(f"model.mod.first_layer must be >= 0, got {self.first_layer}")
        if not 0 < self.capacity <= 1:
            raise ValueError(f"model.mod.capacity must be in (0, 1], got {self.capacity}")

    def routed_layers(self, num_layers: int) -> list[int]:
        """Indices of the routed layers (empty when disabled)."""
        if not self.enabled:
            return []
        return list(range(self.first_layer, num_layers, self.interval))


def mod_capacity(num_positions: int, capacity: float) -> int:
    """k = ceil(capacity * N), at least 1 (a MoD layer never processes nothing)."""
    return max(1, min(num_positions, math.ceil(round(capacity * num_positions, 9))))


def matched_num_layers(num_layers: int, cfg: MoDConfig) -> int:
    """Fewest layers whose MoD model does at least the per-token block compute of ``num_layers``.

    A routed layer counts ``capacity`` of a layer (attention pairs and the router ignored), e.g.
    4 dense layers -> 7 MoD layers at interval 2, first 0, capacity 0.25 (3 full + 4 x 0.25).
    """
    n = num_layers
    while True:
        routed = len(range(cfg.first_layer, n, cfg.interval))
        if (n - routed) + routed * cfg.capacity >= num_layers - 1e-9:
            return n
        n += 1


@dataclass(frozen=True)
class SequenceLayout:
    """Where every position sits in the batch (what a subset needs to rebuild mask and RoPE).

    Attributes:
        position_BT: position inside the document (RoPE).
        document_BT: document index inside the row.
        span_BT: bidirectional span ids (-1 = none) or None.
        document_masking: attention stays inside documents (else causal over the row).
        head_dim: attention head width (RoPE).
        rope_theta: RoPE base.
        attention_backend: "sdpa" or "flex" (see ``build_attention_mask``).
    """

    position_BT: torch.Tensor
    document_BT: torch.Tensor
    span_BT: torch.Tensor | None
    document_masking: bool
    head_dim: int
    rope_theta: float
    attention_backend: str = "sdpa"


class MoDRouter(nn.Module):
    """The router of one MoD layer: ``r = sigmoid(x . w)``, batch top-k, gated residual.

    Args:
        dim: model width D.
        capacity: fraction of positions processed.
        site: router site name (``layer{i}_mod``).
    """

    def __init__(self, dim: int, capacity: float, site: str):
        super().__init__()
        self.capacity, self.site = capacity, site
        self.weight = nn.Parameter(torch.empty(1, dim))

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)

    def forward(
        self,
        block: nn.Module,
        x_ND: torch.Tensor,
        *,
        plan: RoutingPlan,
        layout: SequenceLayout,
        ctx: RoutingContext,
    ) -> torch.Tensor:
        """Run ``block`` on the selected positions only and add the gated delta.

        Args:
            block: the transformer block (called as ``block(x, plan=, mask=, rope=, ctx=)``).
            x_ND: residual stream, plan-sorted.
            plan: the batch's tower plan.
            layout: positions, documents and spans of the batch.
            ctx: the forward's routing context.

        Returns:
            The new residual stream, plan-sorted.
        """
        N = x_ND.shape[0]
        gate_N = torch.sigmoid(F.linear(x_ND.float(), self.weight.float())[:, 0])
        ctx.metrics[f"mod/{self.site}/score_mean"] = gate_N.detach().mean()
        if ctx.causal:
            chosen_N = ctx.causal_selection(self.site, x_ND)[:, 0]
            slot_K = torch.nonzero(chosen_N).reshape(-1)  # data-dependent size: a sync
        else:
            k = mod_capacity(N, self.capacity)
            slot_K = torch.topk(gate_N.detach(), k).indices
            if ctx.trace is not None:
                target_N = torch.zeros(N, device=x_ND.device).index_fill_(0, slot_K, 1.0)
                ctx.record(self.site, x_ND, target_N[:, None])
        ctx.add_ratio("mod/selected_frac", torch.tensor(float(slot_K.numel())), N)
        if slot_K.numel() == 0:
            return x_ND
        # Selected positions in ORIGINAL order (causality), then the subset's own tower plan.
        orig_K = torch.sort(plan.perm_N.index_select(0, slot_K)).values
        group_K = plan.group_N.index_select(0, orig_K)
        counts = tuple(torch.bincount(group_K, minlength=plan.num_groups).tolist())  # the sync
        sub = plan.subset(orig_K, counts)
        parent_K = plan.inv_perm_N.index_select(0, orig_K.index_select(0, sub.perm_N))
        x_KD = x_ND.index_select(0, parent_K)
        mask, rope = _subset_mask_and_rope(layout, orig_K)
        out_KD = block(x_KD, plan=sub, mask=mask, rope=rope, ctx=ctx)
        delta_KD = (out_KD - x_KD) * gate_N.index_select(0, parent_K)[:, None]
        return x_ND.index_add(0, parent_K, delta_KD.to(x_ND.dtype))


def _subset_mask_and_rope(layout: SequenceLayout, orig_K: torch.Tensor):
    """Mask and RoPE of the selected positions, as one row of length K in original order.

    Two selected positions may attend iff they share the original row and document (or row only
    without document masking) and the key does not come later (or they share a span).
    """
    B, T = layout.document_BT.shape
    row_N = torch.arange(B * T, device=orig_K.device) // T
    key_N = row_N * T + (layout.document_BT.reshape(-1) if layout.document_masking else 0)
    document_1K = key_N.index_select(0, orig_K)[None]
    span_1K = None
    if layout.span_BT is not None:
        span_1K = layout.span_BT.reshape(-1).index_select(0, orig_K)[None]
    position_1K = layout.position_BT.reshape(-1).index_select(0, orig_K)[None]
    mask = build_attention_mask(document_1K, span_1K, layout.attention_backend)
    return mask, rope_angles(position_1K, layout.head_dim, layout.rope_theta)
