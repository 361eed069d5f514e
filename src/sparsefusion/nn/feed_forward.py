"""SwiGLU feed-forward network (arXiv 2002.05202) with per-tower weights.

``y = w2(silu(w1 x) * w3 x)``, bias-free; w1 and w3 are fused into one (G, 2F, D) TowerLinear.

Shape legend: N = flattened positions (plan-sorted), D = model width, F = hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsefusion.nn.routing import RoutingPlan
from sparsefusion.nn.tower_linear import LinearImpl, TowerLinear


def ffn_hidden_dim(dim: int, multiple_of: int = 32, ffn_hidden: int = 0) -> int:
    """Hidden width of the SwiGLU FFN.

    Args:
        dim: model width D.
        multiple_of: round the automatic width up to a multiple of this.
        ffn_hidden: explicit width; 0 = automatic, ``int(2 * 4 * dim / 3)`` rounded up (the
            Llama shrink that keeps the parameter count of a 4*dim two-matrix MLP).

    Returns:
        The hidden width F.
    """
    if ffn_hidden > 0:
        return ffn_hidden
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def swiglu_gate(h_F2: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of the fused (..., 2F) w1/w3 projection: the one SwiGLU activation
    of every FFN and expert."""
    gate_F, up_F = h_F2.chunk(2, dim=-1)
    return F.silu(gate_F) * up_F


class TowerFFN(nn.Module):
    """SwiGLU FFN with ``num_towers`` independent weight sets.

    Args:
        dim: model width D.
        hidden_dim: hidden width F.
        num_towers: towers G (1 = shared FFN).
        impl: TowerLinear implementation.
    """

    def __init__(
        self, dim: int, hidden_dim: int, num_towers: int = 1, impl: LinearImpl = "grouped"
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.w13 = TowerLinear(dim, 2 * hidden_dim, num_towers, impl)  # [w1; w3]
        self.w2 = TowerLinear(hidden_dim, dim, num_towers, impl)

    def init_weights(self, std: float, out_std: float) -> None:
        """Normal init: ``std`` for w1/w3, ``out_std`` for the output projection w2."""
        self.w13.init_weights(std)
        self.w2.init_weights(out_std)

    def forward(self, x_ND: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """Apply each position's tower FFN (plan-sorted in and out).

        Args:
            x_ND: inputs, plan-sorted.
            plan: the routing plan.

        Returns:
            y_ND, plan-sorted.
        """
        return self.w2(swiglu_gate(self.w13(x_ND, plan)), plan)
