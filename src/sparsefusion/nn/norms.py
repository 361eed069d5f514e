"""RMSNorm with one weight vector per tower (group of a routing plan).

Shape legend: N = flattened positions (plan-sorted), G = towers, D = normalised width
(the last dim; any dims between N and D, e.g. attention heads, share the position's weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsefusion.nn.routing import RoutingPlan


def per_position(weight_GD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Expand per-tower rows to per-position rows in plan-sorted order, without a host sync.

    Args:
        weight_GD: one row per tower.
        plan: the routing plan (host counts give the output size, device offsets the repeats).

    Returns:
        weight_ND: row ``weight_GD[g]`` repeated ``plan.counts[g]`` times.
    """
    if plan.per_token:
        return weight_GD.index_select(0, plan.group_N)
    offsets_G = plan.offsets_G.to(torch.int64)
    repeats_G = torch.diff(offsets_G, prepend=offsets_G.new_zeros(1))
    return torch.repeat_interleave(weight_GD, repeats_G, dim=0, output_size=plan.num_positions)


class _TowerScale(torch.autograd.Function):
    """``y * weight[g]`` on each tower's contiguous slice of rows (plan-sorted input).

    The same arithmetic as the per-position product, but every slice broadcasts its tower's row
    (as the one-tower norm does), so no (N, D) weight tensor is built, and the weight gradient
    is a per-slice sum. Eager only: a compiled graph takes the per-position product (the
    compiler fuses it).
    """

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, weight_GD: torch.Tensor, slices: list[tuple[int, int]]):
        ctx.save_for_backward(y_ND, weight_GD)
        ctx.slices = slices
        out_ND = torch.empty_like(y_ND)
        for g, (s, e) in enumerate(slices):
            torch.mul(y_ND[s:e], weight_GD[g], out=out_ND[s:e])
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        y_ND, weight_GD = ctx.saved_tensors
        grad_y_ND = torch.empty_like(y_ND)
        grad_w_GD = torch.zeros_like(weight_GD)
        for g, (s, e) in enumerate(ctx.slices):
            torch.mul(grad_ND[s:e], weight_GD[g], out=grad_y_ND[s:e])
            if e > s:
                torch.sum((grad_ND[s:e] * y_ND[s:e]).flatten(0, -2), dim=0, out=grad_w_GD[g])
        return grad_y_ND, grad_w_GD, None


class TowerRMSNorm(nn.Module):
    """RMSNorm over the last dim with ``num_towers`` weight vectors.

    ``y = x / sqrt(mean(x^2) + eps) * weight[tower(x)]``, computed in fp32 and cast back.

    Args:
        dim: normalised width D.
        num_towers: number of towers G (1 = plain RMSNorm; the plan is then not needed).
        eps: added to the mean square.
    """

    def __init__(self, dim: int, num_towers: int = 1, eps: float = 1e-5):
        super().__init__()
        if num_towers < 1:
            raise ValueError(f"num_towers must be >= 1, got {num_towers}")
        self.dim, self.num_towers, self.eps = dim, num_towers, eps
        self.weight = nn.Parameter(torch.empty(num_towers, dim))  # (G, D)

    def init_weights(self) -> None:
        """Set every tower's scale to ones."""
        nn.init.ones_(self.weight)

    def forward(self, x_ND: torch.Tensor, plan: RoutingPlan | None = None) -> torch.Tensor:
        """Normalise ``x_N...D`` (positions first, in plan-sorted order when G > 1).

        Args:
            x_ND: input; dims between the first and the last share the position's weight.
            plan: the routing plan; required when G > 1.

        Returns:
            The normalised tensor, same shape and dtype as the input.
        """
        y_ND = F.rms_norm(x_ND.float(), (self.dim,), eps=self.eps)
        if self.num_towers == 1:
            return (y_ND * self.weight[0].float()).type_as(x_ND)
        if plan is None or plan.num_groups != self.num_towers:
            raise ValueError(f"TowerRMSNorm with {self.num_towers} towers needs a matching plan")
        if not (torch.compiler.is_compiling() or plan.per_token):
            return _TowerScale.apply(y_ND, self.weight.float(), plan.slices()).type_as(x_ND)
        w_ND = per_position(self.weight, plan).float()
        w_ND = w_ND.view(w_ND.shape[0], *([1] * (x_ND.dim() - 2)), self.dim)
        return (y_ND * w_ND).type_as(x_ND)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, towers={self.num_towers}, eps={self.eps}"
