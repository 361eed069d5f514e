"""Expert layers: expert choice vs the every-expert reference, token choice vs per token, k."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsefusion.nn.moe import ExpertGroup, MoEConfig, MoEFeedForward, expert_capacity
from sparsefusion.nn.routing import build_plan
from sparsefusion.nn.routing_context import RoutingContext


def _group(E: int, **kw) -> ExpertGroup:
    torch.manual_seed(0)
    g = ExpertGroup(8, 12, E, MoEConfig(**kw), "layer0_ffn_text")
    g.init_weights(0.3, 0.3)
    return g


def _run_with_grads(g: ExpertGroup, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y, _ = g(x, RoutingContext())
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = [p.grad.clone() for p in g.parameters()] + [x.grad.clone()]
    g.zero_grad()
    return y.detach(), grads


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
@pytest.mark.parametrize("n,E,capacity", [(16, 4, 1.0), (13, 3, 2.0), (5, 8, 1.0), (9, 2, 0.5)])
def test_expert_choice_equals_every_expert_then_mask(gate, n, E, capacity):
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(1))
    fast = _group(E, gate=gate, capacity=capacity)
    ref = _group(E, gate=gate, capacity=capacity, impl="reference")
    y_fast, g_fast = _run_with_grads(fast, x)
    y_ref, g_ref = _run_with_grads(ref, x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_expert_choice_selection_is_top_k_per_expert_and_unchosen_tokens_get_zero():
    g = _group(2, capacity=0.5)  # k = ceil(10 * 0.5 / 2) = 3 per expert: >= 4 tokens unrouted
    x = torch.randn(10, 8)
    y, stats = g(x, RoutingContext(trace=True))
    target = stats.records[0].target_nE
    assert target.shape == (10, 2) and target.sum(0).tolist() == [3.0, 3.0]
    scores = torch.sigmoid(x @ g.router.detach().T)
    for e in range(2):
        assert set(target[:, e].nonzero().flatten().tolist()) == set(
            scores[:, e].topk(3).indices.tolist()
        )
    unrouted = target.sum(1) == 0
    assert unrouted.any() and torch.all(y[unrouted] == 0)
    metrics = stats.resolved_metrics()
    assert metrics["moe/unrouted_frac"].item() == pytest.approx(unrouted.float().mean().item())


def test_one_expert_at_capacity_one_is_the_plain_ffn():
    g = _group(1, capacity=1.0)
    assert not g.routed and g.router is None
    x = torch.randn(7, 8)
    a, b = F.linear(x, g.w13[0]).chunk(2, dim=-1)
    torch.testing.assert_close(g(x, RoutingContext())[0], F.linear(F.silu(a) * b, g.w2[0]))
    assert _group(1, capacity=0.5).routed  # below capacity 1 a single expert does route


def test_moe_ffn_routes_inside_each_tower_slice():
    torch.manual_seed(0)
    cfg = MoEConfig(experts={"text": 2, "image": 3})
    ffn = MoEFeedForward(8, 12, [2, 3], cfg, ["l0_text", "l0_image"])
    ffn.init_weights(0.3, 0.3)
    plan = build_plan(torch.tensor([1, 0, 1, 1, 0, 1, 1]), 2)
    x = torch.randn(7, 8)
    y, _ = ffn(x, plan)
    s, e = plan.slices()[1]
    torch.testing.assert_close(y[s:e], ffn.groups[1](x[s:e], RoutingContext())[0])


@pytest.mark.parametrize(
    "n,E,c,k",
    [
        (16, 4, 1.0, 4),
        (10, 4, 1.0, 3),  # 2.5 rounds up
        (10, 1, 0.3, 3),  # 3.0000000000000004 must not become 4
        (3, 8, 1.0, 1),  # fewer tokens than experts: every expert still takes one
        (5, 2, 2.0, 5),  # capacity = E: every expert takes every token
        (0, 4, 1.0, 0),  # empty modality: no work
        (7, 4, 4.0, 7),
    ],
)
def test_expert_capacity_arithmetic(n, E, c, k):
    assert expert_capacity(n, E, c) == k


def test_empty_group_and_fewer_tokens_than_experts_do_not_crash():
    torch.manual_seed(0)
    ffn = MoEFeedForward(8, 12, [4, 4], MoEConfig(), ["a", "b"])
    ffn.init_weights(0.3, 0.3)
    for groups in ([0, 0, 0], [1, 0, 0], [0]):
        plan = build_plan(torch.tensor(groups), 2)
        x = torch.randn(len(groups), 8, requires_grad=True)
        y, stats = ffn(x, plan, RoutingContext())
        y.sum().backward()
        assert torch.isfinite(y).all() and y.shape == x.shape
        assert all(torch.isfinite(v).all() for v in stats.resolved_metrics().values())


def _per_token_reference(g: ExpertGroup, x: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(x @ g.router.T, dim=-1)
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        w, idx = probs[i].topk(g.cfg.top_k)
        for weight, e in zip(w, idx.tolist(), strict=True):
            a, b = F.linear(x[i], g.w13[e]).chunk(2, dim=-1)
            out[i] = out[i] + weight * F.linear(F.silu(a) * b, g.w2[e])
    return out


@pytest.mark.parametrize("impl", ["grouped", "reference"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_token_choice_dropless_equals_per_token_reference(impl, top_k):
    g = _group(4, router="token_choice", gate="softmax", top_k=top_k, impl=impl)
    x = torch.randn(11, 8, generator=torch.Generator().manual_seed(3))
    y, stats = g(x, RoutingContext())
    torch.testing.assert_close(y, _per_token_reference(g, x), rtol=1e-5, atol=1e-6)
    assert set(stats.losses) == {"moe/load_balance", "moe/router_z"}
    logits = x @ g.router.T
    probs = torch.softmax(logits, dim=-1)
    frac = torch.bincount(probs.topk(top_k).indices.flatten(), minlength=4) / (11 * top_k)
    expected = 0.01 * 4 * (frac * probs.mean(0)).sum()
    torch.testing.assert_close(stats.losses["moe/load_balance"], expected)
    z = 0.001 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(stats.losses["moe/router_z"], z)
    (y.sum() + sum(stats.losses.values())).backward()
    assert g.router.grad is not None and g.router.grad.abs().sum() > 0


def test_causal_mode_uses_aux_decisions_and_main_gate():
    g = _group(3)

    class Fixed:
        def logits(self, site, x):
            return torch.tensor([[1.0, -1.0, 1.0]]).expand(x.shape[0], 3)

    x = torch.randn(6, 8)
    y, _ = g(x, RoutingContext(mode="causal", aux_routers=Fixed()))
    scores = torch.sigmoid(x @ g.router.T) * torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(y, g._every_expert_masked(x, scores))
    with pytest.raises(ValueError, match="aux_routers"):
        g(x, RoutingContext(mode="causal"))


def test_bad_moe_config_values():
    for kw, match in [
        (dict(capacity=0.0), "capacity"),
        (dict(router="hash"), "router"),
        (dict(experts={"text": 0}), "experts"),
        (dict(top_k=0), "top_k"),
        (dict(gate="relu"), "gate"),
    ]:
        with pytest.raises(ValueError, match=match):
            MoEConfig(**kw)


def test_gate_default_follows_the_router():
    """Token choice is a softmax router (Switch/Mixtral); expert choice keeps MoMa's sigmoid."""
    assert MoEConfig(router="token_choice").gate == "softmax"
    assert MoEConfig(router="expert_choice").gate == "sigmoid"
    assert MoEConfig(router="token_choice", gate="sigmoid").gate == "sigmoid"  # explicit wins
