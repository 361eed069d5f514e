"""TowerLinear: a linear layer with one weight matrix (and optional bias) per tower (group).

The input is in routing-plan sorted order, so every tower owns one contiguous slice of rows and
all towers run in one grouped matmul (``torch.nn.functional.grouped_mm``). A readable reference
path loops over the slices. With one tower it is a plain ``F.linear``: the dense model is the
Mixture-of-Transformers model with one tower.

Shape legend: N = flattened positions (plan-sorted), G = towers, I = in features,
O = out features.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparsefusion.nn.norms import per_position
from sparsefusion.nn.routing import RoutingPlan

LinearImpl = Literal["grouped", "reference"]


@functools.cache
def _cuda_supports_grouped_mm(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def grouped_mm_usable(dtype: torch.dtype, device: torch.device, in_dim: int, out_dim: int) -> bool:
    """Whether ``grouped_mm`` can run these weights (decided from dtype/device/shape, never data).

    The kernel needs row strides that are multiples of 16 bytes (fp32: multiples of 4 features,
    bf16: multiples of 8). On CPU it handles fp32/bf16/fp16 in eager mode; on CUDA bf16 on
    SM >= 80. Under ``torch.compile`` (torch 2.13) its fake-tensor rule accepts only bf16, so a
    compiled fp32/fp16 graph takes the reference slice loop instead of failing to trace.

    Args:
        dtype: compute dtype of the matmul.
        device: device of the weights.
        in_dim: in features.
        out_dim: out features.

    Returns:
        True when the grouped kernel may be used.
    """
    if not hasattr(F, "grouped_mm"):
        return False
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return False
    elem = torch.finfo(dtype).bits // 8
    if (in_dim * elem) % 16 or (out_dim * elem) % 16:
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and _cuda_supports_grouped_mm(device.index or 0)
    return device.type == "cpu"


class ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    The CPU grouped_mm backward rejects expanded (stride-0) gradients, e.g. from ``y.sum()``.
    """

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class TowerLinear(nn.Module):
    """Linear layer with ``num_towers`` independent weight matrices (bias-free by default).

    Args:
        in_dim: in features I.
        out_dim: out features O.
        num_towers: number of towers G (1 = plain linear, the plan is then ignored).
        impl: "grouped" (one grouped matmul, falls back to the loop where unsupported) or
            "reference" (loop over the plan's slices).
        bias: add a per-tower bias (G, O) (e.g. Qwen2's Q/K/V); False registers no parameter.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_towers: int = 1,
        impl: LinearImpl = "grouped",
        bias: bool = False,
    ):
        super().__init__()
        if num_towers < 1:
            raise ValueError(f"num_towers must be >= 1, got {num_towers}")
        if impl not in ("grouped", "reference"):
            raise ValueError(f"impl must be 'grouped' or 'reference', got {impl!r}")
        self.in_dim, self.out_dim, self.num_towers, self.impl = in_dim, out_dim, num_towers, impl
        # (G, O, I): tower g maps x -> x @ weight[g].T
        self.weight = nn.Parameter(torch.empty(num_towers, out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(num_towers, out_dim)) if bias else None  # (G, O)

    def init_weights(self, std: float) -> None:
        """Draw every tower's weights independently from N(0, std^2); the bias starts at 0."""
        nn.init.normal_(self.weight, mean=0.0, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x_NI: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """Apply each position's tower weights.

        Args:
            x_NI: inputs in plan-sorted order.
            plan: the routing plan (its groups are this layer's towers when G > 1).

        Returns:
            y_NO in the same (sorted) order.
        """
        if self.num_towers == 1:
            return F.linear(x_NI, self.weight[0], None if self.bias is None else self.bias[0])
        if self.bias is not None:
            y_NO = self._forward_towers(x_NI, plan)
            return y_NO + per_position(self.bias, plan).to(y_NO.dtype)
        return self._forward_towers(x_NI, plan)

    def _forward_towers(self, x_NI: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        if plan.num_groups != self.num_towers:
            raise ValueError(
                f"plan has {plan.num_groups} groups, layer has {self.num_towers} towers"
            )
        w_GOI = self.weight
        if torch.is_autocast_enabled(x_NI.device.type):
            dtype = torch.get_autocast_dtype(x_NI.device.type)
            x_NI, w_GOI = x_NI.to(dtype), w_GOI.to(dtype)
        if plan.per_token:
            return per_token_forward(x_NI, w_GOI, plan.group_N)
        if self.impl == "grouped" and grouped_mm_usable(
            w_GOI.dtype, w_GOI.device, self.in_dim, self.out_dim
        ):
            y_NO = F.grouped_mm(x_NI, w_GOI.transpose(-2, -1), offs=plan.offsets_G)
            return ContiguousGrad.apply(y_NO)
        return _reference_forward(x_NI, w_GOI, plan)

    def extra_repr(self) -> str:
        text = f"in={self.in_dim}, out={self.out_dim}, towers={self.num_towers}, impl={self.impl}"
        return text + (", bias=True" if self.bias is not None else "")


def per_token_forward(
    x_NI: torch.Tensor, w_GOI: torch.Tensor, group_N: torch.Tensor
) -> torch.Tensor:
    """Every tower's projection of every row in one matmul, then each row's own tower.

    The static-shape path of a per-token plan (a decode step of a few rows): G times the
    arithmetic of the sorted path, no data-dependent shape and no host read.
    """
    G, O, I = w_GOI.shape
    y_NGO = F.linear(x_NI, w_GOI.reshape(G * O, I)).view(-1, G, O)
    index_N1O = group_N.view(-1, 1, 1).expand(-1, 1, O)
    return y_NGO.gather(1, index_N1O).squeeze(1)


def _reference_forward(x_NI: torch.Tensor, w_GOI: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Loop over the plan's contiguous slices: ``x[s:e] @ w[g].T``, then concatenate."""
    parts = [x_NI[s:e] @ w_GOI[g].T for g, (s, e) in enumerate(plan.slices())]
    return torch.cat(parts, dim=0)
