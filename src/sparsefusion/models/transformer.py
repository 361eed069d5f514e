"""Chameleon-recipe early-fusion decoder: dense or Mixture-of-Transformers (MoT, arXiv 2411.04996).

One unified-vocabulary embedding, then blocks of self-attention and a SwiGLU FFN, a final RMSNorm
and an untied output head. Every projection and sublayer norm can be untied per tower (a tower
serves one or more modalities); attention itself is global over the interleaved sequence.
The residual stream stays in routing-plan sorted order through the whole layer stack, so each
layer's tower matmuls read contiguous slices and only attention visits the original order.

Shape legend: B = batch rows, T = sequence length, N = B*T flattened positions, D = model width,
V = vocabulary size.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from sparsefusion.nn.attention import AttentionMask, TowerAttention, build_attention_mask
from sparsefusion.nn.embeddings import OutputHead, TokenEmbedding
from sparsefusion.nn.feed_forward import TowerFFN, ffn_hidden_dim
from sparsefusion.nn.norms import TowerRMSNorm
from sparsefusion.nn.rope import RopeAngles, rope_angles
from sparsefusion.nn.routing import RoutingPlan, build_plan


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of the decoder.

    Attributes:
        arch: "dense" (one tower) or "mot" (towers per ``towers``).
        vocab_size: unified vocabulary size; 0 = set from the tokenizers by the trainer.
        modalities: modality names; the order defines the ids in ``modality_BT``.
        towers: modality -> tower name; empty = one tower per modality. Ignored for "dense".
        dim: model width.
        num_layers: number of blocks.
        num_heads: query heads.
        num_kv_heads: key/value heads (0 = num_heads; fewer = grouped-query attention).
        ffn_hidden: SwiGLU hidden width (0 = int(8 * dim / 3) rounded up to ``multiple_of``).
        multiple_of: rounding of the automatic FFN width.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        qk_norm: RMSNorm over the head dim on queries and keys, before RoPE (Chameleon).
        norm_placement: "pre" (Llama: x + f(norm(x))) or "post" (Chameleon/Swin: x + norm(f(x))).
        untie_attention: per-tower Q/K/V/O (mot only).
        untie_ffn: per-tower FFN (mot only).
        untie_norms: per-tower attention/FFN sublayer norms (mot only).
        untie_qk_norm: per-tower QK-norm weights (mot only).
        linear_impl: "grouped" (one grouped matmul per projection) or "reference" (slice loop).
        init_std: std of the normal init (output projections use std / sqrt(2 * num_layers)).
        max_seq_len: longest sequence the model is meant for (generation caches, presets).
        document_masking: True = attention stays inside documents (and honours spans);
            False = plain causal attention over each row (SDPA's flash path), ignoring documents.
    """

    arch: Literal["dense", "mot"] = "mot"
    vocab_size: int = 0
    modalities: list[str] = field(default_factory=lambda: ["text", "image"])
    towers: dict[str, str] = field(default_factory=dict)
    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0
    ffn_hidden: int = 0
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    qk_norm: bool = True
    norm_placement: Literal["pre", "post"] = "post"
    untie_attention: bool = True
    untie_ffn: bool = True
    untie_norms: bool = True
    untie_qk_norm: bool = True
    linear_impl: Literal["grouped", "reference"] = "grouped"
    init_std: float = 0.02
    max_seq_len: int = 4096
    document_masking: bool = True

    def __post_init__(self) -> None:
        _check_choice("arch", self.arch, ("dense", "mot"))
        _check_choice("norm_placement", self.norm_placement, ("pre", "post"))
        _check_choice("linear_impl", self.linear_impl, ("grouped", "reference"))
        for name in ("dim", "num_layers", "num_heads", "multiple_of", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("vocab_size", "num_kv_heads", "ffn_hidden"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by num_heads")
        if self.head_dim % 2:
            raise ValueError(f"model.dim / num_heads = {self.head_dim} must be even (RoPE)")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"model.num_kv_heads ({self.kv_heads}) must divide num_heads")
        self._check_modalities()

    def _check_modalities(self) -> None:
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"model.modalities must be non-empty and unique: {self.modalities}")
        unknown = sorted(set(self.towers) - set(self.modalities))
        if unknown:
            raise ValueError(
                f"model.towers has unknown modalities {unknown}; known {self.modalities}"
            )
        missing = [m for m in self.modalities if m not in self.towers]
        if self.towers and missing:
            raise ValueError(f"model.towers must map every modality; missing {missing}")
        if any(not t for t in self.towers.values()):
            raise ValueError(f"model.towers has an empty tower name: {self.towers}")
        if self.arch == "dense" and self.towers:
            warnings.warn("model.towers is ignored for arch='dense' (one tower)", stacklevel=3)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Resolved number of key/value heads."""
        return self.num_kv_heads or self.num_heads

    @property
    def hidden_dim(self) -> int:
        """Resolved SwiGLU hidden width."""
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_hidden)

    @property
    def tower_names(self) -> list[str]:
        """Tower names in index order (first appearance along ``modalities``)."""
        if self.arch == "dense":
            return ["dense"]
        if not self.towers:
            return list(self.modalities)
        return list(dict.fromkeys(self.towers[m] for m in self.modalities))

    @property
    def tower_of_modality(self) -> list[int]:
        """Tower index of each modality index (all 0 for dense)."""
        if self.arch == "dense":
            return [0] * len(self.modalities)
        names = self.tower_names
        return [names.index(self.towers.get(m, m)) for m in self.modalities]

    @property
    def num_towers(self) -> int:
        """Number of towers (groups of the routing plan)."""
        return len(self.tower_names)

    def towers_for(self, untie: bool) -> int:
        """Weight sets of a component: all towers when untied (and arch is mot), else one."""
        return self.num_towers if untie else 1

    def build(self) -> Transformer:
        """Build the (uninitialised) model; call ``init_weights()`` after placing it."""
        return Transformer(self)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"model.{name} must be one of {choices}, got {value!r}")


@dataclass
class ModelOutput:
    """What the model returns.

    Attributes:
        logits_BTV: next-token logits over the unified vocabulary, original order.
        aux_losses: named auxiliary losses to add to the objective (routers; empty for MoT).
        metrics: named values to log.
    """

    logits_BTV: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


class TransformerBlock(nn.Module):
    """Attention + FFN with per-tower weights; the residual stream is plan-sorted.

    Args:
        cfg: the model config.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.post_norm = cfg.norm_placement == "post"
        self.attention = TowerAttention(
            dim=cfg.dim,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.kv_heads,
            num_towers=cfg.towers_for(cfg.untie_attention),
            qk_norm=cfg.qk_norm,
            qk_norm_towers=cfg.towers_for(cfg.untie_qk_norm),
            norm_eps=cfg.norm_eps,
            impl=cfg.linear_impl,
        )
        self.feed_forward = TowerFFN(
            cfg.dim, cfg.hidden_dim, cfg.towers_for(cfg.untie_ffn), cfg.linear_impl
        )
        norm_towers = cfg.towers_for(cfg.untie_norms)
        self.attention_norm = TowerRMSNorm(cfg.dim, norm_towers, cfg.norm_eps)
        self.ffn_norm = TowerRMSNorm(cfg.dim, norm_towers, cfg.norm_eps)

    def init_weights(self, std: float, out_std: float) -> None:
        """Initialise the sublayers (``out_std`` for the residual output projections)."""
        self.attention.init_weights(std, out_std)
        self.feed_forward.init_weights(std, out_std)
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()

    def forward(
        self, x_ND: torch.Tensor, *, plan: RoutingPlan, mask: AttentionMask, rope: RopeAngles
    ) -> torch.Tensor:
        """One block, pre- or post-norm, on the plan-sorted residual stream."""
        if self.post_norm:
            h_ND = x_ND + self.attention_norm(
                self.attention(x_ND, plan=plan, mask=mask, rope=rope), plan
            )
            return h_ND + self.ffn_norm(self.feed_forward(h_ND, plan), plan)
        a_ND = self.attention(self.attention_norm(x_ND, plan), plan=plan, mask=mask, rope=rope)
        h_ND = x_ND + a_ND
        return h_ND + self.feed_forward(self.ffn_norm(h_ND, plan), plan)


class Transformer(nn.Module):
    """The early-fusion decoder (dense when ``cfg.arch == "dense"``, else MoT).

    Args:
        cfg: the model config; ``cfg.vocab_size`` must be set (> 0).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size is 0: set it from the tokenizers before building")
        self.cfg = cfg
        self.embedding = TokenEmbedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = TowerRMSNorm(cfg.dim, 1, cfg.norm_eps)
        self.output = OutputHead(cfg.dim, cfg.vocab_size)

    def init_weights(self) -> None:
        """Normal(0, init_std) for embeddings/linears, std / sqrt(2L) for output projections."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        self.embedding.init_weights(std)
        for layer in self.layers:
            layer.init_weights(std, out_std)
        self.norm.init_weights()
        self.output.init_weights(std)

    def build_plan(self, modality_BT: torch.Tensor) -> RoutingPlan:
        """Routing plan for ``modality_BT`` on the model's device (host work; not a hot path)."""
        lut = torch.tensor(self.cfg.tower_of_modality, dtype=torch.long)
        plan = build_plan(lut[modality_BT.reshape(-1).cpu().long()], self.cfg.num_towers)
        return plan.to(self.output.weight.device)

    def attention_mask(
        self, document_BT: torch.Tensor, span_BT: torch.Tensor | None = None
    ) -> AttentionMask:
        """The batch's attention mask (built once and shared by every layer)."""
        if self.cfg.document_masking:
            return build_attention_mask(document_BT, span_BT)
        if span_BT is None:
            return AttentionMask.causal()
        return build_attention_mask(torch.zeros_like(document_BT), span_BT)

    def forward(
        self,
        tokens_BT: torch.Tensor,
        *,
        position_BT: torch.Tensor,
        document_BT: torch.Tensor,
        plan: RoutingPlan,
        span_BT: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Compute next-token logits.

        Args:
            tokens_BT: unified-vocabulary ids.
            position_BT: position of each token inside its document (RoPE).
            document_BT: document index inside the row (attention never crosses it).
            plan: tower routing plan over the flattened B*T positions (``Batch.with_plan``).
            span_BT: bidirectional span ids (-1 = none), e.g. Transfusion image spans.

        Returns:
            The logits in original order, (B, T, V).
        """
        B, T = tokens_BT.shape
        if plan.num_positions != B * T or plan.num_groups != self.cfg.num_towers:
            raise ValueError(
                f"plan covers {plan.num_positions} positions in {plan.num_groups} groups; "
                f"expected {B * T} positions in {self.cfg.num_towers} towers"
            )
        mask = self.attention_mask(document_BT, span_BT)
        rope = rope_angles(position_BT, self.cfg.head_dim, self.cfg.rope_theta)
        x_ND = plan.sort(self.embedding(tokens_BT).view(B * T, -1))
        for layer in self.layers:
            x_ND = layer(x_ND, plan=plan, mask=mask, rope=rope)
        logits_NV = self.output(self.norm(plan.unsort(x_ND)))
        return ModelOutput(logits_BTV=logits_NV.view(B, T, -1))
