"""Auxiliary routers for causal inference (MoMa arXiv 2407.21770 section 2.4; spec 4.3).

Batch-level top-k (expert choice, MoD) is not causal. Per routed site a small MLP
``sigmoid(SiLU(x W1) W2)`` with ``W1: D -> D/2`` and ``W2: D/2 -> E`` (E = 1 for MoD) predicts
the batch top-k decision from the token alone; at inference a token is routed iff its score
exceeds 0.5, while the gate value still comes from the main router. They are trained after the
main model, which stays frozen, by binary cross-entropy against the main routers' batch choices.

Shape legend: n = tokens at one site, D = model width, E = router outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AuxRouter(nn.Module):
    """The per-site MLP D -> D/2 (SiLU) -> E.

    Args:
        dim: model width D.
        num_outputs: E (experts of the group, or 1 for a MoD layer).
    """

    def __init__(self, dim: int, num_outputs: int):
        super().__init__()
        self.w1 = nn.Linear(dim, max(1, dim // 2), bias=False)
        self.w2 = nn.Linear(max(1, dim // 2), num_outputs, bias=True)

    def init_weights(self, std: float = 0.02) -> None:
        nn.init.normal_(self.w1.weight, std=std)
        nn.init.normal_(self.w2.weight, std=std)
        nn.init.zeros_(self.w2.bias)

    def forward(self, x_nD: torch.Tensor) -> torch.Tensor:
        """Logits (n, E); the score is their sigmoid."""
        return self.w2(F.silu(self.w1(x_nD.float())))


class AuxRouters(nn.Module):
    """One :class:`AuxRouter` per router site of a model (``Transformer.router_sites()``).

    Args:
        dim: model width D.
        sites: site name -> number of outputs.
    """

    def __init__(self, dim: int, sites: dict[str, int]):
        super().__init__()
        if not sites:
            raise ValueError("the model has no batch-routed sites (expert choice or MoD)")
        self.routers = nn.ModuleDict({s: AuxRouter(dim, e) for s, e in sites.items()})

    def init_weights(self, std: float = 0.02) -> None:
        for router in self.routers.values():
            router.init_weights(std)

    def logits(self, site: str, x_nD: torch.Tensor) -> torch.Tensor:
        """Auxiliary logits of ``site`` (> 0 <=> score > 0.5 <=> routed)."""
        if site not in self.routers:
            raise ValueError(f"no auxiliary router for site {site!r}")
        return self.routers[site](x_nD)
