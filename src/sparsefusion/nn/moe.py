"""Mixture-of-Experts feed-forward layers: expert-choice (MoMa) and token-choice routing.

The FFN input is plan-sorted, so each tower of the routing plan is one contiguous slice. Every
tower owns one *expert group* (MoMa's modality groups ARE the plan's towers, arXiv 2407.21770):
tokens never leave their tower's slice, and routing happens inside the slice.

- Expert choice (arXiv 2202.09368; sigmoid gate as in MoMa): router scores over the group's n
  tokens, each of the E experts takes its top ``k = ceil(n * capacity / E)`` tokens (clipped to n;
  0 for an empty group), the selected tokens go through all experts as ONE batched matmul over
  [E, k, D], and the gate-weighted outputs are index_add-ed back. A token chosen by no expert gets
  0 (it passes on the residual). ``impl="reference"`` computes every expert on every token and
  masks by the selection (for tests only).
- Token choice (Switch / Mixtral style): softmax router, top_k experts per token, dropless
  dispatch (argsort by expert, one grouped matmul with device offsets), Switch load-balancing
  loss and router z-loss returned as auxiliary losses.
- A group with one expert and capacity >= 1 (or one token-choice expert) is a plain SwiGLU FFN:
  no router, gate 1. So ``moma-1t1i`` is exactly MoT's FFN-only untying.

Causal mode (``RoutingContext.mode == "causal"``): an expert processes a token iff the auxiliary
router's score exceeds 0.5; the gate still comes from the main router. This path computes every
expert on every token and masks (inference only, no batch dependence). In a static decode step
(a per-token plan, ``RoutingContext.static``) every group runs on every row and each row keeps
its own group's output, and token choice weights every expert's output by its top-k gates
instead of dispatching: the same sums, with no shape that depends on the routing.

Shape legend: n = tokens of one group, D = model width, F = expert hidden width, E = experts,
k = tokens per expert (expert choice), A = n * top_k assignments (token choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparsefusion.nn.feed_forward import swiglu_gate
from sparsefusion.nn.routing import RoutingPlan
from sparsefusion.nn.routing_context import RouterStats, RoutingContext, ratio
from sparsefusion.nn.tower_linear import ContiguousGrad, grouped_mm_usable


@dataclass(kw_only=True)
class MoEConfig:
    """Expert layers in the FFN (``model.moe.*``).

    Attributes:
        router: "expert_choice" (experts pick tokens; MoMa, MoE-8x) or "token_choice" (tokens pick
            their top_k experts; dropless, with load-balancing and z losses).
        gate: "sigmoid" (MoMa; per-token independent scores), "softmax" (over the group's
            experts: the original expert-choice paper, Switch/Mixtral token choice) or "auto"
            (the default: softmax for token choice, sigmoid for expert choice; resolved when the
            config is built, so a run's config.yaml names the gate it trained with).
        experts: tower (= modality, with default towers) -> experts in that tower's group, for
            arch "moma" (every tower) and "mot" (chosen towers; the others keep a plain FFN),
            e.g. ``{text: 4, image: 4}``. Must be empty for arch "moe".
        num_experts: experts of the single mixed group of arch "moe".
        capacity: expert-choice capacity factor c in (0, E]: each expert takes
            ``ceil(n * c / E)`` of its group's n tokens (c = 1: one expert per token on average,
            the dense model's FFN compute).
        top_k: experts per token (token choice).
        load_balance_weight: Switch load-balancing loss weight (token choice).
        router_z_weight: router z-loss weight (token choice).
        gumbel_noise: add Gumbel-sigmoid (logistic) noise to the routing scores in training
            (upcycling, arXiv 2407.21770 section 2.5); the gate stays noise-free.
        impl: "grouped" (batched/grouped matmul over routed tokens only) or "reference"
            (every expert on every token, then mask; for tests).
    """

    router: Literal["expert_choice", "token_choice"] = "expert_choice"
    gate: Literal["auto", "sigmoid", "softmax"] = "auto"
    experts: dict[str, int] = field(default_factory=dict)
    num_experts: int = 8
    capacity: float = 1.0
    top_k: int = 1
    load_balance_weight: float = 0.01
    router_z_weight: float = 0.001
    gumbel_noise: bool = False
    impl: Literal["grouped", "reference"] = "grouped"

    def __post_init__(self) -> None:
        _check("router", self.router, ("expert_choice", "token_choice"))
        _check("gate", self.gate, ("auto", "sigmoid", "softmax"))
        if self.gate == "auto":
            self.gate = "softmax" if self.router == "token_choice" else "sigmoid"
        _check("impl", self.impl, ("grouped", "reference"))
        if self.num_experts < 1:
            raise ValueError(f"model.moe.num_experts must be >= 1, got {self.num_experts}")
        bad = {k: v for k, v in self.experts.items() if v < 1}
        if bad:
            raise ValueError(f"model.moe.experts counts must be >= 1, got {bad}")
        if not self.capacity > 0:
            raise ValueError(f"model.moe.capacity must be in (0, E], got {self.capacity}")
        if self.top_k < 1:
            raise ValueError(f"model.moe.top_k must be >= 1, got {self.top_k}")
        for name in ("load_balance_weight", "router_z_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.moe.{name} must be >= 0, got {getattr(self, name)}")

    def is_routed(self, num_experts: int) -> bool:
        """Whether a group of ``num_experts`` needs a router (else it is a plain FFN)."""
        if self.router == "token_choice":
            return num_experts > 1
        return num_experts > 1 or self.capacity < 1


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"model.moe.{name} must be one of {choices}, got {value!r}")


def expert_capacity(num_tokens: int, num_experts: int, capacity: float) -> int:
    """Tokens per expert k = ceil(n * c / E), clipped to [0, n] (0 for an empty group).

    Args:
        num_tokens: n, tokens of the group in the routing unit (host int).
        num_experts: E, experts of the group.
        capacity: capacity factor c.

    Returns:
        k (host int).
    """
    if num_tokens <= 0:
        return 0
    # Round before ceil so that e.g. 0.3 * 10 / 1 = 3.0000000000000004 gives 3, not 4.
    return min(num_tokens, math.ceil(round(num_tokens * capacity / num_experts, 9)))


class ExpertGroup(nn.Module):
    """E SwiGLU experts with stacked weights and (when routed) a linear router.

    Args:
        dim: model width D.
        hidden_dim: expert hidden width F (each expert is a full-size FFN).
        num_experts: E.
        cfg: routing settings.
        site: router site name (metrics, auxiliary routers), e.g. ``layer0_ffn_text``.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, cfg: MoEConfig, site: str):
        super().__init__()
        self.cfg, self.site, self.num_experts = cfg, site, num_experts
        self.routed = cfg.is_routed(num_experts)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * hidden_dim, dim))  # [w1; w3]
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.router = nn.Parameter(torch.empty(num_experts, dim)) if self.routed else None

    def init_weights(self, std: float, out_std: float) -> None:
        """Independent normal init per expert; the router uses ``std``."""
        nn.init.normal_(self.w13, std=std)
        nn.init.normal_(self.w2, std=out_std)
        if self.router is not None:
            nn.init.normal_(self.router, std=std)

    def forward(self, x_nD: torch.Tensor, ctx: RoutingContext) -> tuple[torch.Tensor, RouterStats]:
        """Route the group's tokens to its experts (or apply the plain FFN).

        Returns:
            The group's output (n, D) and its router stats (fresh values).
        """
        if not self.routed:
            return _swiglu(x_nD, self.w13[0], self.w2[0]), RouterStats.empty()
        if x_nD.shape[0] == 0:
            # An empty group still joins the graph (zero gradients), so every rank of a
            # data-parallel job reduces the same parameters (FSDP2/DDP collectives must match).
            zero = 0.0 * sum(p.sum() for p in self.parameters())
            return x_nD.new_zeros(x_nD.shape) + zero, RouterStats.empty()
        logits_nE = F.linear(x_nD.float(), self.router.float())
        scores_nE = _activate(logits_nE, self.cfg.gate)
        stats = self._score_metrics(scores_nE)
        if self.cfg.router == "token_choice" and ctx.static:  # same sum, no dispatch shapes
            gate_nK, expert_nK = torch.topk(scores_nE, min(self.cfg.top_k, self.num_experts), -1)
            weight_nE = torch.zeros_like(scores_nE).scatter(1, expert_nK, gate_nK)
            y_nD, more = self._every_expert_masked(x_nD, weight_nE), RouterStats.empty()
        elif self.cfg.router == "token_choice":
            y_nD, more = self._token_choice(x_nD, logits_nE, scores_nE)
        elif ctx.causal:
            selected_nE = ctx.causal_selection(self.site, x_nD)
            more = ratio("moe/unrouted_frac", (~selected_nE.any(-1)).sum(), x_nD.shape[0])
            y_nD = self._every_expert_masked(x_nD, scores_nE * selected_nE)
        else:
            y_nD, more = self._expert_choice(x_nD, logits_nE, scores_nE, ctx)
        return y_nD, stats.merge(more)

    def _expert_choice(
        self, x_nD: torch.Tensor, logits_nE: torch.Tensor, scores_nE: torch.Tensor, ctx
    ) -> tuple[torch.Tensor, RouterStats]:
        n, E = scores_nE.shape
        k = expert_capacity(n, E, self.cfg.capacity)
        select_nE = scores_nE
        if self.cfg.gumbel_noise and self.training:
            select_nE = _activate(logits_nE + _logistic_noise(logits_nE), self.cfg.gate)
        idx_Ek = torch.topk(select_nE.detach().T, k, dim=1).indices
        gate_Ek = scores_nE.T.gather(1, idx_Ek)
        hits_n = torch.zeros(n, device=x_nD.device).index_add_(
            0, idx_Ek.reshape(-1), torch.ones(E * k, device=x_nD.device)
        )
        stats = ratio("moe/unrouted_frac", (hits_n == 0).sum(), n)
        stats.metrics[f"moe/{self.site}/load_max"] = torch.tensor(k * E / (n * self.cfg.capacity))
        if ctx.trace:
            selected_nE = hits_n.new_zeros(E, n).scatter_(1, idx_Ek, 1.0).T
            stats = stats._replace(records=ctx.records(self.site, x_nD, selected_nE))
        if self.cfg.impl == "reference":
            mask_En = torch.zeros(E, n, device=x_nD.device).scatter_(1, idx_Ek, 1.0)
            return self._every_expert_masked(x_nD, scores_nE * mask_En.T), stats
        D = x_nD.shape[1]
        xin_EkD = x_nD.index_select(0, idx_Ek.reshape(-1)).view(E, k, D)
        y_EkD = self._every_expert(xin_EkD)
        contrib_AD = (y_EkD * gate_Ek[..., None]).reshape(E * k, D).to(x_nD.dtype)
        return x_nD.new_zeros(n, D).index_add(0, idx_Ek.reshape(-1), contrib_AD), stats

    def _every_expert_masked(self, x_nD: torch.Tensor, weight_nE: torch.Tensor) -> torch.Tensor:
        """Reference: y = sum_e weight[:, e] * FFN_e(x) with every expert run on every token."""
        y_EnD = self._every_expert(x_nD.unsqueeze(0).expand(self.num_experts, -1, -1))
        return (y_EnD * weight_nE.T[..., None]).sum(0).to(x_nD.dtype)

    def _every_expert(self, xin_EmD: torch.Tensor) -> torch.Tensor:
        """Expert e's FFN on row e of (E, m, D) inputs, as two batched matmuls."""
        h_EmF2 = torch.bmm(xin_EmD, self.w13.transpose(1, 2).to(xin_EmD.dtype))
        act_EmF = swiglu_gate(h_EmF2)
        return torch.bmm(act_EmF, self.w2.transpose(1, 2).to(act_EmF.dtype))

    def _token_choice(
        self, x_nD: torch.Tensor, logits_nE: torch.Tensor, scores_nE: torch.Tensor
    ) -> tuple[torch.Tensor, RouterStats]:
        n, E = scores_nE.shape
        K = min(self.cfg.top_k, E)
        gate_nK, expert_nK = torch.topk(scores_nE, K, dim=-1)
        expert_A = expert_nK.reshape(-1)
        order_A = torch.argsort(expert_A, stable=True)
        token_A = order_A // K
        # A fixed-size count (bincount's output size is data-dependent and breaks compiled graphs).
        counts_E = torch.zeros(E, dtype=torch.long, device=x_nD.device).scatter_add_(
            0, expert_A, torch.ones_like(expert_A)
        )
        stats = self._balance_losses(logits_nE, counts_E, n * K)
        stats.metrics[f"moe/{self.site}/load_max"] = counts_E.max().float() * E / (n * K)
        xin_AD = x_nD.index_select(0, token_A)
        if torch.is_autocast_enabled(xin_AD.device.type):  # grouped_mm is not autocast-aware
            xin_AD = xin_AD.to(torch.get_autocast_dtype(xin_AD.device.type))
        if self.cfg.impl == "grouped" and grouped_mm_usable(
            xin_AD.dtype, xin_AD.device, x_nD.shape[1], self.w2.shape[2]
        ):
            offs_E = counts_E.cumsum(0).to(torch.int32)
            h_AF2 = F.grouped_mm(xin_AD, self.w13.transpose(1, 2).to(xin_AD.dtype), offs=offs_E)
            act_AF = swiglu_gate(ContiguousGrad.apply(h_AF2))
            w2_EFD = self.w2.transpose(1, 2).to(act_AF.dtype)
            y_AD = ContiguousGrad.apply(F.grouped_mm(act_AF, w2_EFD, offs=offs_E))
        else:  # Loop over experts: needs the counts on the host (one sync, a graph break).
            parts, start = [], 0
            for e, c in enumerate(counts_E.tolist()):
                parts.append(_swiglu(xin_AD[start : start + c], self.w13[e], self.w2[e]))
                start += c
            y_AD = torch.cat(parts, dim=0)
        gate_A = gate_nK.reshape(-1)[order_A]
        contrib_AD = (y_AD * gate_A[:, None]).to(x_nD.dtype)
        return x_nD.new_zeros(x_nD.shape).index_add(0, token_A, contrib_AD), stats

    def _balance_losses(self, logits_nE, counts_E, num_assign: int) -> RouterStats:
        """Switch load balance E * sum_e f_e * P_e and router z-loss mean(logsumexp^2)."""
        E = logits_nE.shape[1]
        probs_nE = torch.softmax(logits_nE, dim=-1)
        frac_E = counts_E.float() / num_assign
        losses = {}
        if self.cfg.load_balance_weight > 0:
            balance = E * (frac_E * probs_nE.mean(0)).sum()
            losses["moe/load_balance"] = self.cfg.load_balance_weight * balance
        if self.cfg.router_z_weight > 0:
            z = torch.logsumexp(logits_nE, dim=-1).square().mean()
            losses["moe/router_z"] = self.cfg.router_z_weight * z
        return RouterStats(losses, {}, {}, ())

    def _score_metrics(self, scores_nE: torch.Tensor) -> RouterStats:
        s = scores_nE.detach()
        std = s.std() if s.numel() > 1 else s.new_zeros(())
        metrics = {f"moe/{self.site}/score_mean": s.mean(), f"moe/{self.site}/score_std": std}
        return RouterStats({}, metrics, {}, ())


def _activate(logits_nE: torch.Tensor, gate: str) -> torch.Tensor:
    return torch.sigmoid(logits_nE) if gate == "sigmoid" else torch.softmax(logits_nE, dim=-1)


def _logistic_noise(like: torch.Tensor) -> torch.Tensor:
    """G' - G'' for i.i.d. Gumbel(0, 1): a standard logistic sample."""
    u = torch.rand_like(like).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def _swiglu(x_nD: torch.Tensor, w13_FD: torch.Tensor, w2_DF: torch.Tensor) -> torch.Tensor:
    """One expert's FFN (plain matmuls)."""
    act_nF = swiglu_gate(F.linear(x_nD, w13_FD.to(x_nD.dtype)))
    return F.linear(act_nF, w2_DF.to(act_nF.dtype))


class MoEFeedForward(nn.Module):
    """One expert group per tower, each routing inside its tower's slice of the plan.

    Args:
        dim: model width D.
        hidden_dim: expert hidden width F.
        experts_per_group: experts of each tower's group (1 with capacity >= 1 = plain FFN).
        cfg: routing settings.
        sites: router site name of each group (``layer{i}_ffn_{tower}``).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        experts_per_group: list[int],
        cfg: MoEConfig,
        sites: list[str],
    ):
        super().__init__()
        self.groups = nn.ModuleList(
            ExpertGroup(dim, hidden_dim, e, cfg, s)
            for e, s in zip(experts_per_group, sites, strict=True)
        )

    def init_weights(self, std: float, out_std: float) -> None:
        """Initialise every group."""
        for group in self.groups:
            group.init_weights(std, out_std)

    def forward(
        self, x_ND: torch.Tensor, plan: RoutingPlan, ctx: RoutingContext | None = None
    ) -> tuple[torch.Tensor, RouterStats]:
        """Apply each tower's expert group to its contiguous slice (plan-sorted in and out)."""
        ctx = ctx if ctx is not None else RoutingContext()
        if len(self.groups) == 1:
            return self.groups[0](x_ND, ctx)
        if plan.num_groups != len(self.groups):
            raise ValueError(f"plan has {plan.num_groups} groups, FFN has {len(self.groups)}")
        if plan.per_token:  # a static step: every group on every row, each row keeps its own
            return self._per_token(x_ND, plan, ctx)
        parts, stats = [], RouterStats.empty()
        for g, (s, e) in zip(self.groups, plan.slices(), strict=True):
            y_nD, group_stats = g(x_ND[s:e], ctx)
            parts.append(y_nD)
            stats = stats.merge(group_stats)
        return torch.cat(parts, dim=0), stats

    def _per_token(self, x_ND: torch.Tensor, plan: RoutingPlan, ctx: RoutingContext):
        y_ND, stats = torch.zeros_like(x_ND), RouterStats.empty()
        for g, group in enumerate(self.groups):
            y_g_ND, group_stats = group(x_ND, ctx)
            y_ND = torch.where((plan.group_N == g)[:, None], y_g_ND, y_ND)
            stats = stats.merge(group_stats)
        return y_ND, stats
