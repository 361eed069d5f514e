"""Mixture-of-Depths (arXiv 2404.02258; MoMa's MoD, arXiv 2407.21770 section 2.3).

At a routed layer a router ``r = sigmoid(w . x)`` scores every position. With
``selection="row"`` (the default, as the MoD paper routes per sequence) every row keeps its own
top ``k = max(1, ceil(capacity * T))`` positions; with ``selection="batch"`` (MoMa's wording: top-k
of the whole batch before the modality split) the top ``ceil(capacity * B * T)`` positions of the
batch are taken, so rows keep different numbers. Either way the selected tokens run the whole
block (attention among the selected tokens of their own row only, and the FFN / expert groups)
with their ORIGINAL positions (RoPE), documents and causal order; the block's delta is scaled by
the gate and added once: ``x_i + r_i * (block(X_sel)_i - x_i)``. Unselected tokens skip the
block. The gate puts the router on the gradient path.

Per-row subsets attend as a (B, k) batch: about ``B * k^2`` score pairs. Batch selection has
uneven rows, so its subset runs as one row of K tokens under a row-and-document mask (K^2 pairs
computed for a dense mask; only in-row pairs are attended).

The subset needs its own routing plan (its per-tower counts). Those counts come from device
indices, so building the sub-plan costs ONE device-to-host sync per MoD layer (documented
exception to the no-sync rule); the same transfer brings the per-document selected counts, from
which the layer reports the (query, key) pairs it attended (``mod/<site>/pairs``, for the FLOPs
count). In causal mode the selection is ``aux(x) > 0.5`` per token, so k is data-dependent
(inference only); such a subset always runs as one row of K tokens. With a KV cache
(incremental decoding, ``generate/``) the selected tokens of each row run as B rows against the
layer's cache, which keeps only the tokens this layer processed; filler (padding) never routes.
A static step (``RoutingContext.static``: one token per row, or an image span's fixed block of
patches; compiled) instead runs the block on every token and lets the layer's cache keep only the
selected ones, discarding the others' outputs: no sync and no data-dependent shape, the same
result for the selected tokens.

Shape legend: B = batch rows, T = sequence length, N = B*T positions, K = selected positions,
k = selected positions per row, D = model width, M = B * kmax per-row entries of a cached
subset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparsefusion.nn.attention import AttentionMask, KVStep, build_attention_mask
from sparsefusion.nn.rope import RopeScalingConfig, rope_angles
from sparsefusion.nn.routing import RoutingPlan, plan_from_counts
from sparsefusion.nn.routing_context import RouterStats, RoutingContext, ratio


@dataclass(kw_only=True)
class MoDConfig:
    """Mixture-of-Depths settings (``model.mod.*``).

    Attributes:
        enabled: wrap the routed layers in a MoD router.
        interval: route every ``interval``-th layer (MoMa: 2).
        first_layer: the first routed layer (MoMa: 0); routed = first_layer, +interval, ...
        capacity: fraction of the positions a routed layer processes, in (0, 1] (MoMa: 0.25).
        selection: "row" (every row keeps its top ceil(capacity * T) positions: the MoD paper's
            per-sequence routing; attention cost B * k^2) or "batch" (top ceil(capacity * B * T)
            of the whole batch, MoMa's wording; rows keep uneven counts).
    """

    enabled: bool = False
    interval: int = 2
    first_layer: int = 0
    capacity: float = 0.25
    selection: Literal["row", "batch"] = "row"

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"model.mod.interval must be >= 1, got {self.interval}")
        if self.first_layer < 0:
            raise ValueError(f"model.mod.first_layer must be >= 0, got {self.first_layer}")
        if not 0 < self.capacity <= 1:
            raise ValueError(f"model.mod.capacity must be in (0, 1], got {self.capacity}")
        if self.selection not in ("row", "batch"):
            raise ValueError(
                f"model.mod.selection must be 'row' or 'batch', got {self.selection!r}"
            )

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
        rope_scaling: RoPE frequency scaling (None: plain RoPE).
    """

    position_BT: torch.Tensor
    document_BT: torch.Tensor
    span_BT: torch.Tensor | None
    document_masking: bool
    head_dim: int
    rope_theta: float
    attention_backend: str = "sdpa"
    rope_scaling: RopeScalingConfig | None = None


class MoDRouter(nn.Module):
    """The router of one MoD layer: ``r = sigmoid(x . w)``, top-k, gated residual.

    Args:
        dim: model width D.
        capacity: fraction of positions processed.
        site: router site name (``layer{i}_mod``).
        selection: "row" or "batch" (see :class:`MoDConfig`).
    """

    def __init__(self, dim: int, capacity: float, site: str, selection: str = "row"):
        super().__init__()
        self.capacity, self.site, self.selection = capacity, site, selection
        self.weight = nn.Parameter(torch.empty(1, dim))

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)

    def gate(self, x_ND: torch.Tensor) -> torch.Tensor:
        """The gate ``sigmoid(x . w)`` of every position (N,)."""
        return torch.sigmoid(F.linear(x_ND.float(), self.weight.float())[:, 0])

    def forward(
        self,
        block: nn.Module,
        x_ND: torch.Tensor,
        *,
        plan: RoutingPlan,
        layout: SequenceLayout,
        ctx: RoutingContext,
        kv: KVStep | None = None,
    ) -> tuple[torch.Tensor, RouterStats]:
        """Run ``block`` on the selected positions only and add the gated delta.

        Args:
            block: the transformer block (``block(x, plan=, mask=, rope=, ctx=) -> (x, stats)``).
            x_ND: residual stream, plan-sorted.
            plan: the batch's tower plan.
            layout: positions, documents and spans of the batch.
            ctx: the forward's routing context.
            kv: this layer's KV cache step (incremental decoding, causal routing only): the
                block then runs on the selected tokens laid out per row, and the cache keeps
                only them.

        Returns:
            The new residual stream, plan-sorted, and the router stats of the layer.
        """
        N = x_ND.shape[0]
        if kv is not None and not ctx.causal:
            raise ValueError(
                "a Mixture-of-Depths layer decodes with a KV cache in causal mode only"
            )
        if ctx.static:
            return self._static(block, x_ND, plan, layout, ctx, kv)
        gate_N = self.gate(x_ND)
        stats = RouterStats({}, {f"mod/{self.site}/score_mean": gate_N.detach().mean()}, {}, ())
        real_N = None if kv is None else kv.real_BT().reshape(-1)  # filler never routes
        orig_K, rows = self._select(gate_N, x_ND, plan, layout, ctx, real_N)
        if ctx.trace:
            target_N = torch.zeros(N, device=x_ND.device)
            target_N.index_fill_(0, plan.inv_perm_N.index_select(0, orig_K), 1.0)
            stats = stats._replace(records=ctx.records(self.site, x_ND, target_N[:, None]))
        stats = stats.merge(ratio("mod/selected_frac", torch.tensor(float(orig_K.numel())), N))
        if orig_K.numel() == 0:
            return x_ND, stats
        if kv is not None:
            x_ND, block_stats = _cached_subset(block, x_ND, gate_N, orig_K, plan, layout, ctx, kv)
            return x_ND, stats.merge(block_stats)
        # The subset's own tower plan and attended pairs, from one device-to-host transfer.
        group_K = plan.group_N.index_select(0, orig_K)
        doc_key_K = _document_key(layout).index_select(0, orig_K)
        counts, pairs = _host_counts(group_K, doc_key_K, plan.num_groups, N)
        stats.metrics[f"mod/{self.site}/pairs"] = torch.tensor(float(pairs))
        sub = plan.subset(orig_K, counts)
        parent_K = plan.inv_perm_N.index_select(0, orig_K.index_select(0, sub.perm_N))
        x_KD = x_ND.index_select(0, parent_K)
        mask, rope = _subset_mask_and_rope(layout, orig_K, rows)
        out_KD, block_stats = block(x_KD, plan=sub, mask=mask, rope=rope, ctx=ctx)
        delta_KD = (out_KD - x_KD) * gate_N.index_select(0, parent_K)[:, None]
        return x_ND.index_add(0, parent_K, delta_KD.to(x_ND.dtype)), stats.merge(block_stats)

    def _static(self, block, x_ND, plan, layout, ctx, kv) -> tuple[torch.Tensor, RouterStats]:
        """A static step: the block runs on every token, the cache keeps the selected ones.

        The unselected tokens' block outputs are discarded (``where``, so nothing of them
        leaks) and the layer's cache does not keep them: the same result as running the block
        on the selected subset, with no data-dependent shape and no host read.
        """
        if kv is None:
            raise ValueError("a static Mixture-of-Depths step needs a KV cache")
        gate_N = self.gate(x_ND)
        real_N = plan.sort(kv.real_BT().reshape(-1))  # x_ND is plan-sorted, the cache's tokens not
        chosen_N = ctx.causal_selection(self.site, x_ND)[:, 0] & real_N
        B, T = layout.position_BT.shape
        rope = rope_angles(layout.position_BT, layout.head_dim, layout.rope_theta,
                           layout.rope_scaling)  # fmt: skip
        out_ND, stats = block(x_ND, plan=plan, mask=None, rope=rope, ctx=ctx,
                              kv=kv.gated(plan.unsort(chosen_N).view(B, T)))  # fmt: skip
        delta_ND = (out_ND - x_ND) * gate_N[:, None].to(x_ND.dtype)
        return torch.where(chosen_N[:, None], x_ND + delta_ND, x_ND), stats

    def _select(self, gate_N, x_ND, plan, layout, ctx, real_N=None) -> tuple[torch.Tensor, int]:
        """Selected positions (original order, ascending) and the subset rows (0: one row)."""
        N = x_ND.shape[0]
        if ctx.causal:
            chosen_N = ctx.causal_selection(self.site, x_ND)[:, 0]
            if real_N is not None:
                chosen_N = chosen_N & plan.sort(real_N)
            slot_K = torch.nonzero(chosen_N).reshape(-1)  # data-dependent size: a sync
            return torch.sort(plan.perm_N.index_select(0, slot_K)).values, 0
        if self.selection == "batch":
            slot_K = torch.topk(gate_N.detach(), mod_capacity(N, self.capacity)).indices
            return torch.sort(plan.perm_N.index_select(0, slot_K)).values, 0
        B, T = layout.document_BT.shape
        gate_BT = plan.unsort(gate_N.detach()).view(B, T)
        pos_Bk = torch.sort(
            torch.topk(gate_BT, mod_capacity(T, self.capacity), dim=1).indices
        ).values
        row_B1 = torch.arange(B, device=pos_Bk.device)[:, None] * T
        return (pos_Bk + row_B1).reshape(-1), B


def _cached_subset(block, x_ND, gate_N, orig_K, plan, layout, ctx, kv):
    """Run the block on the selected tokens against the layer's KV cache; add the gated delta."""
    B, T = layout.document_BT.shape
    src_M, dest_K, sub, per_row = _per_row_subset(orig_K, plan, B, T)
    kmax = src_M.numel() // B
    parent_M = plan.inv_perm_N.index_select(0, src_M)
    doc_N = layout.document_BT.reshape(-1)
    if not layout.document_masking:
        doc_N = torch.zeros_like(doc_N)
    document_BK = doc_N.index_select(0, src_M).view(B, kmax)
    span_BK = None
    if layout.span_BT is not None:
        span_BK = layout.span_BT.reshape(-1).index_select(0, src_M).view(B, kmax)
    position_BK = layout.position_BT.reshape(-1).index_select(0, src_M).view(B, kmax)
    rope = rope_angles(position_BK, layout.head_dim, layout.rope_theta, layout.rope_scaling)
    kv_sub = kv.rebind(document_BK, span_BK, per_row)
    x_MD = x_ND.index_select(0, parent_M)
    out_MD, block_stats = block(sub.sort(x_MD), plan=sub, mask=None, rope=rope, ctx=ctx, kv=kv_sub)
    parent_K = parent_M.index_select(0, dest_K)
    out_KD = sub.unsort(out_MD).index_select(0, dest_K)
    delta_KD = (out_KD - x_ND.index_select(0, parent_K)) * gate_N.index_select(0, parent_K)[:, None]
    return x_ND.index_add(0, parent_K, delta_KD.to(x_ND.dtype)), block_stats


def _per_row_subset(orig_K: torch.Tensor, plan: RoutingPlan, B: int, T: int):
    """The selected positions as B rows of ``kmax``: each row's tokens first, then filler.

    One device-to-host transfer brings the per-row and per-tower counts. Filler entries (copies
    of their row's first position, put in tower 0) are computed and discarded; the cache stores
    only the ``per_row[b]`` leading tokens of row b.

    Returns:
        ``src_M`` (original position of each of the B * kmax entries), ``dest_K`` (the entry of
        each selected position), the subset's tower plan and the per-row counts (host ints).
    """
    row_K = torch.div(orig_K, T, rounding_mode="floor")
    group_K = plan.group_N.index_select(0, orig_K)
    host = torch.cat(
        [torch.bincount(row_K, minlength=B), torch.bincount(group_K, minlength=plan.num_groups)]
    ).tolist()  # the sync (as in batch mode)
    per_row, per_group = host[:B], host[B:]
    kmax = max(per_row)
    first_B = torch.tensor([0, *per_row[:-1]], device=orig_K.device).cumsum(0)
    rank_K = torch.arange(orig_K.numel(), device=orig_K.device) - first_B.index_select(0, row_K)
    dest_K = row_K * kmax + rank_K
    rows_M = torch.arange(B * kmax, device=orig_K.device) // kmax
    src_M = (rows_M * T).index_copy(0, dest_K, orig_K)
    group_M = torch.zeros_like(src_M).index_copy(0, dest_K, group_K)
    counts = (per_group[0] + B * kmax - orig_K.numel(), *per_group[1:])
    return src_M, dest_K, plan_from_counts(group_M, counts), per_row


def _document_key(layout: SequenceLayout) -> torch.Tensor:
    """A key per original position that is equal exactly for positions of one row and document."""
    B, T = layout.document_BT.shape
    row_N = torch.arange(B * T, device=layout.document_BT.device) // T
    doc_N = layout.document_BT.reshape(-1) if layout.document_masking else 0
    return row_N * T + doc_N


def _host_counts(group_K, doc_key_K, num_groups: int, N: int) -> tuple[tuple[int, ...], int]:
    """Per-group counts of the subset and its causal in-document pairs (one sync)."""
    per_group = torch.bincount(group_K, minlength=num_groups)
    per_doc = torch.bincount(doc_key_K, minlength=1)
    host = torch.cat([per_group, per_doc]).tolist()  # the sync
    per_doc_host = host[num_groups:]
    return tuple(host[:num_groups]), sum(m * (m + 1) // 2 for m in per_doc_host if m)


def _subset_mask_and_rope(layout: SequenceLayout, orig_K: torch.Tensor, rows: int):
    """Mask and RoPE of the selected positions, in original order.

    ``rows`` > 0: the subset is ``rows`` rows of K / rows tokens each (per-row selection), with the
    rows' own documents. ``rows`` = 0: one row of K tokens, where two selected positions may
    attend iff they share the original row and document (or row only without document masking).
    Either way a key never comes later than its query unless both share a span.
    """
    B, T = layout.document_BT.shape
    if rows:
        shape = (rows, orig_K.numel() // rows)
        document = (
            layout.document_BT.reshape(-1)
            if layout.document_masking
            else torch.zeros(B * T, dtype=torch.long, device=orig_K.device)
        )
    else:
        shape = (1, orig_K.numel())
        document = _document_key(layout)
    document_RK = document.index_select(0, orig_K).view(shape)
    span_RK = None
    if layout.span_BT is not None:
        span_RK = layout.span_BT.reshape(-1).index_select(0, orig_K).view(shape)
    position_RK = layout.position_BT.reshape(-1).index_select(0, orig_K).view(shape)
    if rows and not layout.document_masking and span_RK is None:
        mask = AttentionMask.causal()
    else:
        mask = build_attention_mask(document_RK, span_RK, layout.attention_backend)
    return mask, rope_angles(position_RK, layout.head_dim, layout.rope_theta, layout.rope_scaling)
