"""The routing plan: sort/unsort are inverse permutations, with gather-only gradients."""

from __future__ import annotations

import torch

from sparsefusion.nn.routing import build_plan


def _plan():
    return build_plan(torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]]), 2)


def test_sort_groups_positions_and_unsort_inverts_it():
    plan = _plan()
    x_ND = torch.arange(10.0).view(10, 1)
    sorted_ND = plan.sort(x_ND)
    assert plan.group_N[plan.perm_N].tolist() == [0] * 5 + [1] * 5
    torch.testing.assert_close(sorted_ND, x_ND.index_select(0, plan.perm_N), rtol=0, atol=0)
    torch.testing.assert_close(plan.unsort(sorted_ND), x_ND, rtol=0, atol=0)


def test_sort_and_unsort_gradients_equal_index_select_gradients():
    plan = _plan()
    torch.manual_seed(0)
    x_ND = torch.randn(10, 3, requires_grad=True)
    w_ND = torch.randn(10, 3)
    ((plan.unsort(plan.sort(x_ND) * w_ND) * w_ND).sum()).backward()
    x_ref = x_ND.detach().clone().requires_grad_(True)
    y_ref = x_ref.index_select(0, plan.perm_N) * w_ND
    ((y_ref.index_select(0, plan.inv_perm_N) * w_ND).sum()).backward()
    torch.testing.assert_close(x_ND.grad, x_ref.grad, rtol=0, atol=0)


def test_sort_without_autograd_returns_plain_values():
    plan = _plan()
    ids_N = torch.arange(10)
    assert plan.sort(ids_N).tolist() == plan.perm_N.tolist()
    with torch.no_grad():
        x_ND = torch.randn(10, 2, requires_grad=True)
        assert not plan.unsort(x_ND).requires_grad
