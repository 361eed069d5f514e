"""torch.compile of every block type: no graph breaks, and compiled equals eager.

The trainer and the benchmark compile each block (``distributed/parallelize.py``); a graph break
inside the routing layers would split the block graph and cost a host round trip each step.
MoD routers stay outside the compiled blocks (their top-k size is host data by design).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch._dynamo as dynamo

from sparsefusion.nn.rope import rope_angles
from sparsefusion.nn.routing_context import RoutingContext
from sparsefusion.runs.presets import resolve_config

PRESETS = ["dense", "mot", "moe-8x", "moma-1t1i", "moma-4t4i", "mot-text-moe4"]


def _block_inputs(preset: str, dtype: torch.dtype, **overrides):
    cfg = resolve_config(f"{preset}-debug", []).model
    cfg = replace(cfg, vocab_size=97, **overrides)
    torch.manual_seed(0)
    model = cfg.build()
    model.init_weights()
    model = model.to(dtype)
    B, T = 2, 48
    g = torch.Generator().manual_seed(0)
    plan = model.build_plan(torch.randint(0, 2, (B, T), generator=g))
    document = torch.zeros(B, T, dtype=torch.long)
    document[0, 30:] = 1
    position = torch.arange(T).expand(B, T).clone()
    position[0, 30:] -= 30
    kwargs = dict(
        plan=plan,
        mask=model.attention_mask(document),
        rope=rope_angles(position, cfg.head_dim, cfg.rope_theta),
        ctx=RoutingContext(mode="batch"),
    )
    x = torch.randn(B * T, cfg.dim, generator=g).to(dtype)
    return model.layers[0], x, kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("preset", PRESETS)
def test_block_compiles_without_graph_breaks(preset, dtype):
    block, x, kwargs = _block_inputs(preset, dtype)
    explained = dynamo.explain(block)(x, **kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_token_choice_block_compiles_without_graph_breaks():
    """bf16: the grouped-matmul path (fp32 under compile takes the host-count loop instead)."""
    cfg = resolve_config("moe-8x-debug", []).model
    block, x, kwargs = _block_inputs(
        "moe-8x", torch.bfloat16, moe=replace(cfg.moe, router="token_choice")
    )
    explained = dynamo.explain(block)(x, **kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("preset", ["mot", "moma-4t4i"])
def test_compiled_block_equals_eager(preset):
    block, x, kwargs = _block_inputs(preset, torch.float32)
    x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = block(x_eager, **kwargs)[0]
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    y_comp = compiled(x_comp, **{**kwargs, "ctx": RoutingContext(mode="batch")})[0]
    torch.testing.assert_close(y_comp, y_eager, atol=1e-5, rtol=1e-5)
    grads = []
    for y, inp in ((y_eager, x_eager), (y_comp, x_comp)):
        block.zero_grad(set_to_none=True)
        y.square().mean().backward()
        grads.append((inp.grad, [p.grad.clone() for p in block.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-5)
    for g_c, g_e in zip(grads[1][1], grads[0][1], strict=True):
        torch.testing.assert_close(g_c, g_e, atol=1e-5, rtol=1e-4)
