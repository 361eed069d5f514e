"""Chameleon-recipe early-fusion decoder: dense, MoT (arXiv 2411.04996), MoE / MoMa (2407.21770).

One unified-vocabulary embedding, then blocks of self-attention and a SwiGLU FFN, a final RMSNorm
and an untied output head. Every projection and sublayer norm can be untied per tower (a tower
serves one or more modalities); attention itself is global over the interleaved sequence.
The residual stream stays in routing-plan sorted order through the whole layer stack, so each
layer's tower matmuls read contiguous slices and only attention visits the original order.
Sparse FFNs (``nn/moe.py``) route inside each tower's slice; Mixture-of-Depths (``nn/mod.py``)
wraps whole blocks at routed layers.

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

from sparsefusion.models.inputs import ForwardContext, ModelInputs, plan_for
from sparsefusion.nn.attention import AttentionMask, KVStep, TowerAttention, build_attention_mask
from sparsefusion.nn.embeddings import OutputHead, TiedOutputHead, TokenEmbedding
from sparsefusion.nn.feed_forward import TowerFFN, ffn_hidden_dim
from sparsefusion.nn.mod import MoDConfig, MoDRouter, SequenceLayout
from sparsefusion.nn.moe import MoEConfig, MoEFeedForward
from sparsefusion.nn.norms import TowerRMSNorm
from sparsefusion.nn.patch_embed import PatchEmbed, PatchHead
from sparsefusion.nn.rope import RopeAngles, RopeScalingConfig, rope_angles
from sparsefusion.nn.routing import RoutingPlan
from sparsefusion.nn.routing_context import RouterRecord, RouterStats, RoutingContext
from sparsefusion.nn.unet_patch import UNetDown, UNetShape, UNetState, UNetUp, unet_levels


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of the decoder.

    Attributes:
        arch: "dense" (one tower), "mot" (towers per ``towers``), "moe" (one tower whose FFN is
            ``moe.num_experts`` mixed experts) or "moma" (shared attention and norms; each
            tower's FFN is an expert group of ``moe.experts[tower]`` experts). "mot" with
            ``moe.experts`` set is the hybrid (chosen towers' FFNs become expert groups).
        vocab_size: unified vocabulary size; 0 = set from the tokenizers by the trainer.
        modalities: modality names; the order defines the ids in ``modality_BT``.
        towers: modality -> tower name; empty = one tower per modality. Ignored for "dense" and
            "moe". For "moma" the towers are the modality groups of the experts.
        dim: model width.
        num_layers: number of blocks.
        num_heads: query heads.
        num_kv_heads: key/value heads (0 = num_heads; fewer = grouped-query attention).
        ffn_hidden: SwiGLU hidden width (0 = int(8 * dim / 3) rounded up to ``multiple_of``).
        multiple_of: rounding of the automatic FFN width.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_scaling: RoPE frequency scaling (Llama 3.1's ``llama3``), see
            ``RopeScalingConfig``.
        qkv_bias: a bias on the Q/K/V projections (Qwen2).
        tie_embeddings: the output head reuses the embedding table (small Qwen2/Llama 3.2).
        qk_norm: RMSNorm over the head dim on queries and keys, before RoPE (Chameleon).
        norm_placement: "pre" (Llama: x + f(norm(x))) or "post" (Chameleon/Swin: x + norm(f(x))).
        untie_attention: per-tower Q/K/V/O (mot only; the untie_* flags are ignored otherwise).
        untie_ffn: per-tower FFN (mot only).
        untie_norms: per-tower attention/FFN sublayer norms (mot only).
        untie_qk_norm: per-tower QK-norm weights (mot only).
        linear_impl: "grouped" (one grouped matmul per projection) or "reference" (slice loop).
        init_std: std of the normal init (output projections use std / sqrt(2 * num_layers)).
        max_seq_len: longest sequence the model is meant for (generation caches, presets).
        document_masking: True = attention stays inside documents (and honours spans);
            False = plain causal attention over each row (SDPA's flash path), ignoring documents.
        attention_backend: "sdpa" (dense boolean mask; CPU and GPU, forward and backward) or
            "flex" (FlexAttention with one block mask per batch, skipping masked blocks; for
            GPU training: torch 2.13 has no FlexAttention backward on CPU). Plain causal rows
            always use SDPA's ``is_causal`` path.
        moe: expert layers (router, experts per group, capacity, ...), see ``MoEConfig``.
        mod: Mixture-of-Depths on top of any arch, see ``MoDConfig``.
        upcycle_from: run folder or checkpoint folder of a seed run (dense, mot or 1t1i): at the
            start of a fresh run its FFNs are copied into every expert of the matching group and
            all shared weights are copied; never applied when resuming ("" = off).
        latent_channels: channels of the continuous image latent (Transfusion); 0 = no
            continuous inputs. Set from the VAE tokenizer by the trainer.
        patch_size: side k of the latent patches one position holds (Transfusion; 2 as in the
            paper's main setting). Only used when ``latent_channels > 0``.
        patch_layers: how patches enter and leave the transformer (Transfusion): "linear" (a
            linear layer per patch plus a timestep MLP) or "unet" (diffusers' U-Net down blocks
            in, up blocks out with skips; ``nn/unet_patch.py``).
        latent_size: side of the square latent grid; set from the VAE by the trainer when the
            U-Net needs it (0 with linear patch layers).
        unet_width: channels of the U-Net's first level (level i has ``unet_width * 2 ** i``).
        unet_layers: ResNet blocks per U-Net down block (one more per up block).
    """

    arch: Literal["dense", "mot", "moe", "moma"] = "mot"
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
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    qkv_bias: bool = False
    tie_embeddings: bool = False
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
    attention_backend: Literal["sdpa", "flex"] = "sdpa"
    moe: MoEConfig = field(default_factory=MoEConfig)
    mod: MoDConfig = field(default_factory=MoDConfig)
    upcycle_from: str = ""
    latent_channels: int = 0
    patch_size: int = 2
    patch_layers: Literal["linear", "unet"] = "linear"
    latent_size: int = 0
    unet_width: int = 64
    unet_layers: int = 1

    def __post_init__(self) -> None:
        _check_choice("arch", self.arch, ("dense", "mot", "moe", "moma"))
        _check_choice("norm_placement", self.norm_placement, ("pre", "post"))
        _check_choice("linear_impl", self.linear_impl, ("grouped", "reference"))
        _check_choice("attention_backend", self.attention_backend, ("sdpa", "flex"))
        _check_choice("patch_layers", self.patch_layers, ("linear", "unet"))
        for name in ("dim", "num_layers", "num_heads", "multiple_of", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.patch_size < 1:
            raise ValueError(f"model.patch_size must be >= 1, got {self.patch_size}")
        for name in ("unet_width", "unet_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.patch_layers == "unet" and self.latent_size:
            self.unet_shape()  # raises naming the keys when the U-Net cannot halve the latent
        for name in ("vocab_size", "num_kv_heads", "ffn_hidden", "latent_channels", "latent_size"):
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
        self._check_sparsity()

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
        if self.arch in ("dense", "moe") and self.towers:
            warnings.warn(f"model.towers is ignored for arch={self.arch!r}", stacklevel=3)

    def _check_sparsity(self) -> None:
        experts = self.moe.experts
        if self.arch == "moe" and experts:
            raise ValueError("model.moe.experts is for arch moma/mot; arch moe uses num_experts")
        if self.arch == "dense" and experts:
            raise ValueError("model.moe.experts needs arch moma or mot (dense has no towers)")
        if experts and self.arch in ("mot", "moma"):
            unknown = sorted(set(experts) - set(self.tower_names))
            if unknown:
                raise ValueError(
                    f"model.moe.experts names {unknown}, which are not towers/modalities; "
                    f"towers are {self.tower_names}"
                )
        if self.arch == "moma":
            missing = [t for t in self.tower_names if t not in experts]
            if missing:
                raise ValueError(f"model.moe.experts must give every moma group a count: {missing}")
        if self.arch == "mot" and experts and not self.untie_ffn:
            raise ValueError("model.moe.experts with arch mot needs model.untie_ffn=true")
        if self.moe.router == "expert_choice":
            for tower, e in zip(self.ffn_group_names, self.experts_per_group, strict=True):
                if self.moe.is_routed(e) and self.moe.capacity > e:
                    raise ValueError(
                        f"model.moe.capacity must be in (0, E] for every expert group; got "
                        f"{self.moe.capacity} with {e} expert(s) in group {tower!r}"
                    )
        routed = self.mod.routed_layers(self.num_layers)
        if self.mod.enabled and self.num_layers < 2:
            raise ValueError("model.mod needs a model with at least 2 layers (num_layers=1)")
        if self.mod.enabled and not routed:
            raise ValueError(
                f"model.mod.first_layer={self.mod.first_layer} leaves no layer to route "
                f"(num_layers={self.num_layers})"
            )

    @property
    def patch_dim(self) -> int:
        """Values per continuous patch (latent channels * k * k; 0 without latents)."""
        return self.latent_channels * self.patch_size**2

    def unet_shape(self) -> UNetShape:
        """The U-Net patch layers' sizes (``patch_layers="unet"``; ValueError naming the keys)."""
        if not self.latent_size:
            raise ValueError(
                "model.patch_layers=unet needs model.latent_size (the latent side; the trainer "
                "sets it from the VAE tokenizer)"
            )
        unet_levels(self.latent_size, self.patch_size)
        return UNetShape(
            self.latent_channels,
            self.latent_size,
            self.patch_size,
            self.dim,
            self.unet_width,
            self.unet_layers,
        )

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
        if self.arch == "moe":
            return ["mixed"]
        if not self.towers:
            return list(self.modalities)
        return list(dict.fromkeys(self.towers[m] for m in self.modalities))

    @property
    def tower_of_modality(self) -> list[int]:
        """Tower index of each modality index (all 0 for dense and moe)."""
        if self.arch in ("dense", "moe"):
            return [0] * len(self.modalities)
        names = self.tower_names
        return [names.index(self.towers.get(m, m)) for m in self.modalities]

    @property
    def num_towers(self) -> int:
        """Number of towers (groups of the routing plan)."""
        return len(self.tower_names)

    def towers_for(self, untie: bool) -> int:
        """Weight sets of a component: all towers when untied (and arch is mot), else one."""
        return self.num_towers if untie and self.arch == "mot" else 1

    @property
    def has_experts(self) -> bool:
        """Whether the FFNs are expert groups (moe, moma, or mot with ``moe.experts``)."""
        return self.arch in ("moe", "moma") or (self.arch == "mot" and bool(self.moe.experts))

    @property
    def ffn_group_names(self) -> list[str]:
        """Names of the FFN weight sets (one per tower when the FFN is per tower)."""
        if self.arch in ("moma",) or (self.arch == "mot" and self.untie_ffn):
            return self.tower_names
        return self.tower_names[:1]

    @property
    def experts_per_group(self) -> list[int]:
        """Experts of each FFN group (1 = plain FFN unless capacity < 1 makes it routed)."""
        if self.arch == "moe":
            return [self.moe.num_experts]
        return [self.moe.experts.get(t, 1) for t in self.ffn_group_names]

    def build(self) -> Transformer:
        """Build the (uninitialised) model; call ``init_weights()`` after placing it."""
        return Transformer(self)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"model.{name} must be one of {choices}, got {value!r}")


@dataclass
class ModelOutput:
    """What the model returns (fresh values, never aliases of state that layers mutate).

    Attributes:
        logits_BTV: next-token logits over the unified vocabulary, original order.
        predictions: other predictions by name (e.g. a diffusion head's noise per patch).
        aux_losses: named auxiliary losses to add to the objective (routers; empty for MoT).
        metrics: named values to log.
        records: the batch routers' inputs and decisions (when the context traces).
    """

    logits_BTV: torch.Tensor
    predictions: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)
    records: list[RouterRecord] = field(default_factory=list)


class TransformerBlock(nn.Module):
    """Attention + FFN with per-tower weights; the residual stream is plan-sorted.

    Args:
        cfg: the model config.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
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
            qkv_bias=cfg.qkv_bias,
        )
        self.feed_forward: TowerFFN | MoEFeedForward
        if cfg.has_experts:
            sites = [f"layer{layer_id}_ffn_{t}" for t in cfg.ffn_group_names]
            self.feed_forward = MoEFeedForward(
                cfg.dim, cfg.hidden_dim, cfg.experts_per_group, cfg.moe, sites
            )
        else:
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
        self,
        x_ND: torch.Tensor,
        *,
        plan: RoutingPlan,
        mask: AttentionMask | None,
        rope: RopeAngles,
        ctx: RoutingContext | None = None,
        kv: KVStep | None = None,
    ) -> tuple[torch.Tensor, RouterStats]:
        """One block, pre- or post-norm, on the plan-sorted residual stream.

        ``kv``: this layer's KV cache step (incremental decoding; the mask is then unused).

        Returns:
            The new residual stream and the router stats of the block's FFN (values).
        """
        if self.post_norm:
            h_ND = x_ND + self.attention_norm(
                self.attention(x_ND, plan=plan, mask=mask, rope=rope, kv=kv), plan
            )
            f_ND, stats = self._ffn(h_ND, plan, ctx)
            return h_ND + self.ffn_norm(f_ND, plan), stats
        a_ND = self.attention(
            self.attention_norm(x_ND, plan), plan=plan, mask=mask, rope=rope, kv=kv
        )
        h_ND = x_ND + a_ND
        f_ND, stats = self._ffn(self.ffn_norm(h_ND, plan), plan, ctx)
        return h_ND + f_ND, stats

    def _ffn(self, x_ND: torch.Tensor, plan: RoutingPlan, ctx: RoutingContext | None):
        if isinstance(self.feed_forward, MoEFeedForward):
            return self.feed_forward(x_ND, plan, ctx)
        return self.feed_forward(x_ND, plan), RouterStats.empty()


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
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.num_layers))
        routed = cfg.mod.routed_layers(cfg.num_layers)
        self.mod_routers = nn.ModuleDict(
            {
                str(i): MoDRouter(cfg.dim, cfg.mod.capacity, f"layer{i}_mod", cfg.mod.selection)
                for i in routed
            }
        )
        self.norm = TowerRMSNorm(cfg.dim, 1, cfg.norm_eps)
        self.output: OutputHead | TiedOutputHead
        if cfg.tie_embeddings:
            self.output = TiedOutputHead(self.embedding)
        else:
            self.output = OutputHead(cfg.dim, cfg.vocab_size)
        # Transfusion: image patches in and predictions out (image-only parameters).
        self.patch_embed: PatchEmbed | UNetDown | None = None
        self.patch_head: PatchHead | UNetUp | None = None
        if cfg.patch_dim and cfg.patch_layers == "unet":
            self.patch_embed = UNetDown(cfg.unet_shape())
            self.patch_head = UNetUp(cfg.unet_shape(), cfg.norm_eps)
        elif cfg.patch_dim:
            self.patch_embed = PatchEmbed(cfg.patch_dim, cfg.dim)
            self.patch_head = PatchHead(cfg.dim, cfg.patch_dim, cfg.norm_eps)

    def init_weights(self) -> None:
        """Normal(0, init_std) for embeddings/linears, std / sqrt(2L) for output projections."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        self.embedding.init_weights(std)
        for layer in self.layers:
            layer.init_weights(std, out_std)
        for router in self.mod_routers.values():
            router.init_weights(std)
        self.norm.init_weights()
        self.output.init_weights(std)
        if self.patch_embed is not None and self.patch_head is not None:
            self.patch_embed.init_weights(std)
            self.patch_head.init_weights(std)

    def router_sites(self) -> dict[str, int]:
        """Batch-routed sites (expert-choice groups, MoD layers) -> number of router outputs."""
        sites = {}
        for layer in self.layers:
            if isinstance(layer.feed_forward, MoEFeedForward):
                for g in layer.feed_forward.groups:
                    if g.routed and self.cfg.moe.router == "expert_choice":
                        sites[g.site] = g.num_experts
        sites.update({r.site: 1 for r in self.mod_routers.values()})
        return dict(sorted(sites.items(), key=lambda kv: int(kv[0][5:].split("_")[0])))

    def build_plan(self, modality_BT: torch.Tensor) -> RoutingPlan:
        """Routing plan for ``modality_BT`` on the model's device (host work; not a hot path)."""
        plan = plan_for(self.cfg.tower_of_modality, self.cfg.num_towers, modality_BT)
        return plan.to(self.output.weight.device)

    def attention_mask(
        self, document_BT: torch.Tensor, span_BT: torch.Tensor | None = None
    ) -> AttentionMask:
        """The batch's attention mask (built once and shared by every layer)."""
        backend = self.cfg.attention_backend
        if self.cfg.document_masking:
            return build_attention_mask(document_BT, span_BT, backend)
        if span_BT is None:
            return AttentionMask.causal()
        return build_attention_mask(torch.zeros_like(document_BT), span_BT, backend)

    def forward(self, inputs: ModelInputs, ctx: ForwardContext | None = None) -> ModelOutput:
        """Compute next-token logits (and the routers' losses and metrics).

        Args:
            inputs: the sequence (``ModelInputs``; build one with ``Batch.model_inputs``).
            ctx: routing mode, auxiliary routers, tracing (``ForwardContext``; default: batch
                routing, no trace). With ``ctx.cache`` set (a KV cache of ``generate/``), the
                inputs are the next tokens of every row: each layer writes their keys and values
                into the cache and attends over the cached prefix and them.

        Returns:
            The logits in original order, (B, T, V), with router losses, metrics and records.
        """
        ctx = ctx if ctx is not None else ForwardContext()
        B, T = inputs.shape
        plan = inputs.plan
        if plan.num_positions != B * T or plan.num_groups != self.cfg.num_towers:
            raise ValueError(
                f"plan covers {plan.num_positions} positions in {plan.num_groups} groups; "
                f"expected {B * T} positions in {self.cfg.num_towers} towers"
            )
        cache = ctx.cache  # incremental decoding: the cache supplies each layer's keys and mask
        mask = None if cache else self.attention_mask(inputs.document_BT, inputs.span_BT)
        rope = rope_angles(
            inputs.position_BT, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling
        )
        routing = ctx.routing()
        layout = self.layout(inputs)
        x_ND, patch_state = self._embed(inputs, plan)
        stats = RouterStats.empty()
        for i, layer in enumerate(self.layers):
            kv = cache.layer(i, self._cache_documents(inputs), inputs.span_BT) if cache else None
            if str(i) in self.mod_routers:  # Mixture-of-Depths: the block sees a subset
                router = self.mod_routers[str(i)]
                x_ND, layer_stats = router(
                    layer, x_ND, plan=plan, layout=layout, ctx=routing, kv=kv
                )
            else:
                x_ND, layer_stats = layer(x_ND, plan=plan, mask=mask, rope=rope, ctx=routing, kv=kv)
            stats = stats.merge(layer_stats)
        logits_NV, predictions = self._heads(plan.unsort(x_ND), inputs, patch_state)
        return ModelOutput(
            logits_BTV=logits_NV.view(B, T, -1),
            predictions=predictions,
            aux_losses=dict(stats.losses),
            metrics=dict(stats.resolved_metrics()),
            records=list(stats.records),
        )

    def _embed(
        self, inputs: ModelInputs, plan: RoutingPlan
    ) -> tuple[torch.Tensor, UNetState | None]:
        """Token embeddings (N, D) in plan-sorted order; patch slots hold the patch embeddings.

        The token ids are sorted before the lookup, so no (N, D) activation is gathered. The
        second value is what the U-Net's up half needs from its down half (None otherwise).
        """
        B, T = inputs.shape
        x_ND = self.embedding(plan.sort(inputs.tokens_BT.reshape(B * T)))
        if inputs.patches_PC is None or inputs.patches_PC.shape[0] == 0:
            return x_ND, None
        if self.patch_embed is None or inputs.patch_slot_P is None or inputs.timestep_P is None:
            raise ValueError(
                "inputs carry latent patches (with slots and timesteps) but the model has no patch "
                "embedder: set model.latent_channels (the Transfusion setting)"
            )
        state = None
        patches_PC = inputs.patches_PC.to(x_ND.dtype)
        if isinstance(self.patch_embed, UNetDown):
            p_PD, state = self.patch_embed(patches_PC, inputs.timestep_P)
        else:
            p_PD = self.patch_embed(patches_PC, inputs.timestep_P)
        slot_P = inputs.patch_slot_P if plan.is_identity else plan.inv_perm_N[inputs.patch_slot_P]
        return x_ND.index_copy(0, slot_P, p_PD.to(x_ND.dtype)), state

    def _heads(
        self, h_ND: torch.Tensor, inputs: ModelInputs, patch_state: UNetState | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """LM logits (N, V) at discrete positions (zeros at patch slots), and the patch head's
        prediction (``noise_PC``: what the objective regresses, noise or velocity).

        When every position is a patch (an image span's fixed block, ``generate/static_span.py``)
        the logits are an expanded zero (nothing computed or allocated, no host read)."""
        slot_P = inputs.patch_slot_P
        if inputs.patches_PC is None or slot_P is None or slot_P.numel() == 0:
            logits_NV = self.output(self.norm(h_ND))
            idle = self._idle_patch_layers()
            return (logits_NV if idle is None else logits_NV + idle), {}
        assert self.patch_head is not None
        N = h_ND.shape[0]
        if slot_P.numel() == N:  # every position is a patch (an image span's block): no logits
            logits_NV = h_ND.new_zeros(()).expand(N, self.output.weight.shape[0])
            return logits_NV, {"noise_PC": self._patch_predictions(h_ND[slot_P], patch_state)}
        discrete_N = torch.ones(N, dtype=torch.bool, device=h_ND.device)
        discrete_N[slot_P] = False
        keep = discrete_N.nonzero().squeeze(1)
        out = self.output(self.norm(h_ND[keep]))
        logits_NV = out.new_zeros(N, out.shape[-1]).index_copy(0, keep, out)
        return logits_NV, {"noise_PC": self._patch_predictions(h_ND[slot_P], patch_state)}

    def _patch_predictions(self, h_PD: torch.Tensor, patch_state: UNetState | None):
        """The patch head's prediction (P, C) from the patch positions' final hidden states."""
        if isinstance(self.patch_head, UNetUp):
            assert patch_state is not None, "the U-Net's up half needs its down half's state"
            return self.patch_head(h_PD, patch_state)
        assert self.patch_head is not None
        return self.patch_head(h_PD)

    def _idle_patch_layers(self) -> torch.Tensor | None:
        """0 * the patch layers' weights, when a batch without images trains a model that has
        them: their gradients are then zeros, not missing, so every data-parallel rank
        reduces the same tensors whether or not its batch held an image."""
        if self.patch_embed is None or self.patch_head is None or not torch.is_grad_enabled():
            return None  # nothing to keep alive: no extra (N, V) add on the plain path
        params = [*self.patch_embed.parameters(), *self.patch_head.parameters()]
        return 0.0 * torch.stack([p.sum() for p in params if p.requires_grad]).sum()

    def _cache_documents(self, inputs: ModelInputs) -> torch.Tensor:
        """Document ids a KV cache compares (all 0 without document masking)."""
        if self.cfg.document_masking:
            return inputs.document_BT
        return torch.zeros_like(inputs.document_BT)

    def layout(self, inputs: ModelInputs) -> SequenceLayout:
        """Where every position sits (what a Mixture-of-Depths subset rebuilds its mask from)."""
        return SequenceLayout(
            position_BT=inputs.position_BT,
            document_BT=inputs.document_BT,
            span_BT=inputs.span_BT,
            document_masking=self.cfg.document_masking,
            attention_backend=self.cfg.attention_backend,
            head_dim=self.cfg.head_dim,
            rope_theta=self.cfg.rope_theta,
            rope_scaling=self.cfg.rope_scaling,
        )
