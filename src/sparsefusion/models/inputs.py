"""What the model's forward takes: one inputs object and an optional context.

:class:`ModelInputs` holds everything about the sequence (ids, modality, positions, documents,
bidirectional spans, the routing plan, and continuous inputs such as Transfusion's image latent
patches with their timesteps). :class:`ForwardContext` holds how to run it (routing mode, the
auxiliary routers, tracing, a KV cache for incremental decoding). Objectives build the inputs from
a batch (``objectives/``); the generation engine builds them one step at a time (``generate/``).

Shape legend: B = batch rows, T = sequence length, P = continuous patches in the batch,
C = values per patch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from sparsefusion.nn.routing import RoutingPlan, build_plan
from sparsefusion.nn.routing_context import AuxRouterLookup, RoutingContext, RoutingMode


@dataclass
class ModelInputs:
    """One forward's sequence.

    Attributes:
        tokens_BT: unified-vocabulary ids (at continuous positions: any id, ignored).
        position_BT: position inside its document (RoPE).
        document_BT: document index inside the row (attention never crosses it).
        plan: the tower routing plan over the flattened B*T positions (it alone decides each
            position's tower).
        modality_BT: modality index of every position (informational: objectives, generation).
        span_BT: bidirectional span ids (-1 = none), e.g. the patches of one image.
        patches_PC: continuous inputs (e.g. noised image latent patches), or None.
        patch_slot_P: flattened position (row * T + t) of every patch.
        timestep_P: diffusion timestep of every patch.
    """

    tokens_BT: torch.Tensor
    position_BT: torch.Tensor
    document_BT: torch.Tensor
    plan: RoutingPlan
    modality_BT: torch.Tensor | None = None
    span_BT: torch.Tensor | None = None
    patches_PC: torch.Tensor | None = None
    patch_slot_P: torch.Tensor | None = None
    timestep_P: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        B, T = self.tokens_BT.shape
        return B, T

    def to(self, device: torch.device | str) -> ModelInputs:
        """A copy with every tensor (and the plan) on ``device``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
            elif isinstance(v, RoutingPlan):
                v = v.to(device)
            out[f.name] = v
        return type(self)(**out)  # subclasses (objectives' extra fields) keep their type


@dataclass(frozen=True)
class ForwardContext:
    """How to run one forward.

    Attributes:
        routing_mode: "batch" (top-k over the batch, as in training) or "causal" (the auxiliary
            routers decide per token; no information from other tokens).
        aux_routers: the auxiliary routers (required for "causal" with batch-routed sites).
        trace: return every batch router's inputs and decisions in ``ModelOutput.records``.
        cache: a KV cache the attention layers read and extend (incremental decoding), or None.
        static: a static-shape step (``generate/static.py``): a per-token plan, a cache, and
            causal routers that select by masking (no host read, no data-dependent shape).
    """

    routing_mode: RoutingMode = "batch"
    aux_routers: AuxRouterLookup | None = None
    trace: bool = False
    cache: Any = None
    static: bool = False

    def routing(self) -> RoutingContext:
        """The read-only routing part handed to the routers."""
        return RoutingContext(self.routing_mode, self.aux_routers, self.trace, self.static)


def plan_for(
    tower_of_modality: list[int], num_towers: int, modality_BT: torch.Tensor
) -> RoutingPlan:
    """The tower routing plan of a batch: the one place a plan is built (on the host).

    Args:
        tower_of_modality: tower index of each modality index (``ModelConfig.tower_of_modality``).
        num_towers: number of towers.
        modality_BT: modality index of every position (any device; read on the host).
    """
    lut = torch.tensor(tower_of_modality, dtype=torch.long)
    return build_plan(lut[modality_BT.reshape(-1).cpu().long()], num_towers)
