"""TowerLinear (grouped vs reference), TowerRMSNorm and TowerFFN against per-position loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsefusion.nn.feed_forward import TowerFFN, ffn_hidden_dim
from sparsefusion.nn.norms import TowerRMSNorm, per_position
from sparsefusion.nn.routing import build_plan
from sparsefusion.nn.tower_linear import TowerLinear, grouped_mm_usable


def _sorted_group_ids(plan) -> torch.Tensor:
    return plan.group_N.index_select(0, plan.perm_N)


def _linear_pair(in_dim: int, out_dim: int, towers: int) -> tuple[TowerLinear, TowerLinear]:
    grouped = TowerLinear(in_dim, out_dim, towers, "grouped")
    grouped.init_weights(0.5)
    reference = TowerLinear(in_dim, out_dim, towers, "reference")
    reference.load_state_dict(grouped.state_dict())
    return grouped, reference


@pytest.mark.parametrize(
    "groups,towers,in_dim,out_dim",
    [
        ([0, 2, 2, 0, 2, 0, 0, 2, 2, 2, 0], 3, 8, 12),  # tower 1 empty
        ([1, 0, 1, 1, 0, 1, 0], 2, 16, 4),
        ([0, 0, 0, 0, 0], 1, 8, 8),  # G = 1: plain linear
        ([0, 1, 1, 0, 1], 2, 6, 10),  # unaligned: grouped falls back to the loop
    ],
)
def test_grouped_equals_reference_forward_and_grads(groups, towers, in_dim, out_dim):
    torch.manual_seed(0)
    plan = build_plan(torch.tensor(groups), towers)
    grouped, reference = _linear_pair(in_dim, out_dim, towers)
    x = torch.randn(len(groups), in_dim)
    x_g, x_r = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_g, y_r = grouped(x_g, plan), reference(x_r, plan)
    torch.testing.assert_close(y_g, y_r, atol=1e-6, rtol=1e-5)
    # Per-position truth: row n uses its own tower's weights.
    tower_N = _sorted_group_ids(plan)
    w = grouped.weight.detach()
    expected = torch.stack([x[n] @ w[tower_N[n] if towers > 1 else 0].T for n in range(len(x))])
    torch.testing.assert_close(y_g.detach(), expected, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(y_g)
    y_g.backward(g)
    y_r.backward(g)
    torch.testing.assert_close(x_g.grad, x_r.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grouped.weight.grad, reference.weight.grad, atol=1e-6, rtol=1e-5)
    if towers == 3:
        assert grouped.weight.grad[1].abs().sum() == 0  # the empty tower gets no gradient


def test_grouped_backward_accepts_expanded_grad():
    torch.manual_seed(0)
    plan = build_plan(torch.tensor([0, 1, 1, 0, 1, 1]), 2)
    grouped, reference = _linear_pair(8, 8, 2)
    grouped(torch.randn(6, 8), plan).sum().backward()  # grad of sum() is a stride-0 tensor
    reference(torch.randn(6, 8), plan).sum().backward()
    assert grouped.weight.grad is not None and grouped.weight.grad.abs().sum() > 0


def test_grouped_mm_usable_rules():
    cpu = torch.device("cpu")
    assert grouped_mm_usable(torch.float32, cpu, 8, 12)
    assert not grouped_mm_usable(torch.float32, cpu, 6, 12)
    assert not grouped_mm_usable(torch.bfloat16, cpu, 12, 16)
    assert grouped_mm_usable(torch.bfloat16, cpu, 16, 24)
    assert not grouped_mm_usable(torch.float64, cpu, 8, 8)


def test_bf16_grouped_matches_fp32_loop():
    torch.manual_seed(0)
    plan = build_plan(torch.tensor([1, 0, 0, 1, 1, 0, 1, 1]), 2)
    layer = TowerLinear(16, 16, 2, "grouped")
    layer.init_weights(0.5)
    x = torch.randn(8, 16)
    ref = layer(x, plan)
    y = layer.to(torch.bfloat16)(x.to(torch.bfloat16), plan)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)


def test_tower_rmsnorm_matches_loop():
    torch.manual_seed(0)
    plan = build_plan(torch.tensor([2, 0, 2, 2, 0, 0, 2]), 3)  # tower 1 empty
    norm = TowerRMSNorm(8, 3, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(3, 8))
    x_NHD = torch.randn(7, 2, 8)  # heads share the position's weight
    y = norm(x_NHD, plan)
    tower_N = _sorted_group_ids(plan)
    for n in range(7):
        row = x_NHD[n]
        expected = (
            row / torch.sqrt(row.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight[tower_N[n]]
        )
        torch.testing.assert_close(y[n], expected, atol=1e-6, rtol=1e-5)
    shared = TowerRMSNorm(8, 1)
    shared.init_weights()
    torch.testing.assert_close(shared(x_NHD), F.rms_norm(x_NHD, (8,), eps=1e-5))


@pytest.mark.parametrize("shape", [(9, 8), (9, 3, 8)])
def test_tower_rmsnorm_slice_path_equals_per_position_product(shape):
    """The eager per-slice scale (fast path) gives the per-position product's values and grads."""
    torch.manual_seed(0)
    plan = build_plan(torch.tensor([2, 0, 2, 2, 0, 0, 2, 0, 2]), 3)  # tower 1 empty
    norm = TowerRMSNorm(8, 3, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(3, 8))
    x = torch.randn(*shape, requires_grad=True)
    grad_out = torch.randn(*shape)
    y = norm(x, plan)
    (y * grad_out).sum().backward()
    w_N = per_position(norm.weight, plan).view(shape[0], *([1] * (len(shape) - 2)), 8)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = norm.weight.detach().clone().requires_grad_(True)
    w_ref_N = per_position(w_ref, plan).view_as(w_N)
    y_ref = F.rms_norm(x_ref, (8,), eps=1e-5) * w_ref_N
    (y_ref * grad_out).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(norm.weight.grad, w_ref.grad, atol=1e-5, rtol=1e-5)
    assert norm.weight.grad[1].abs().max() == 0  # the empty tower gets no gradient


def test_tower_ffn_matches_per_position_swiglu():
    torch.manual_seed(0)
    plan = build_plan(torch.tensor([1, 0, 1, 1, 0, 1, 0, 0, 1]), 2)
    hidden = ffn_hidden_dim(8, multiple_of=4)
    assert hidden == 24  # int(2 * 32 / 3) = 21 -> 24
    ffn = TowerFFN(8, hidden, 2, "grouped")
    ffn.init_weights(0.5, 0.5)
    x = torch.randn(9, 8)
    y = ffn(x, plan)
    tower_N = _sorted_group_ids(plan)
    w13, w2 = ffn.w13.weight.detach(), ffn.w2.weight.detach()
    for n in range(9):
        g = tower_N[n]
        gate, up = (w13[g] @ x[n]).split(hidden)
        torch.testing.assert_close(y[n], w2[g] @ (F.silu(gate) * up), atol=1e-5, rtol=1e-5)


def test_ffn_hidden_dim_rounding_and_override():
    assert ffn_hidden_dim(256, 256) == 768
    assert ffn_hidden_dim(4096, 256) == 11008
    assert ffn_hidden_dim(512, 1, ffn_hidden=100) == 100
    with pytest.raises(ValueError, match="multiple_of"):
        ffn_hidden_dim(64, 0)
