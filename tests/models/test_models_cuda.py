"""CUDA checks: grouped bf16 path vs the reference loop, autocast, and no host syncs in a step."""

from __future__ import annotations

import pytest
import torch

from sparsefusion.models.inputs import ModelInputs
from sparsefusion.models.transformer import ModelConfig
from sparsefusion.nn.routing import build_plan

pytestmark = pytest.mark.gpu


def _setup(impl: str, dtype: torch.dtype = torch.bfloat16):
    cfg = ModelConfig(vocab_size=256, dim=64, num_layers=2, num_heads=4, linear_impl=impl)
    model = cfg.build()
    torch.manual_seed(0)
    model.init_weights()
    model = model.to("cuda", dtype)
    g = torch.Generator().manual_seed(0)
    B, T = 2, 64
    tokens = torch.randint(0, 256, (B, T), generator=g)
    modality = torch.randint(0, 2, (B, T), generator=g)
    document = torch.zeros(B, T, dtype=torch.long)
    document[0, 20:] = 1
    position = torch.arange(T).expand(B, T).clone()
    position[0, 20:] -= 20
    plan = build_plan(modality.reshape(-1), 2).to("cuda")
    batch = dict(
        tokens_BT=tokens.cuda(), position_BT=position.cuda(), document_BT=document.cuda(), plan=plan
    )
    return model, batch


def _step(model, batch):
    out = model(ModelInputs(**batch))
    out.logits_BTV.float().square().mean().backward()
    return out.logits_BTV


def test_cuda_grouped_bf16_matches_reference():
    grouped, batch = _setup("grouped")
    reference, _ = _setup("reference")
    y_g, y_r = _step(grouped, dict(batch)), _step(reference, dict(batch))
    torch.testing.assert_close(y_g.float(), y_r.float(), atol=2e-2, rtol=2e-2)
    for (name, p_g), p_r in zip(grouped.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(
            p_g.grad.float(), p_r.grad.float(), atol=2e-2, rtol=5e-2, msg=name
        )


def test_cuda_autocast_fp32_weights():
    model, batch = _setup("grouped", torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = _step(model, dict(batch))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert model.layers[0].feed_forward.w13.weight.grad.dtype == torch.float32


def _assert_step_without_sync(model, batch) -> None:
    _step(model, dict(batch))  # warm-up (lazy inits may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(model, dict(batch))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_step_has_no_host_sync():
    _assert_step_without_sync(*_setup("grouped"))


@pytest.mark.parametrize("preset", ["dense", "moe-8x", "moma-4t4i", "mot-text-moe4"])
def test_cuda_sparse_step_has_no_host_sync(preset):
    """Expert-choice groups take k from the plan's host counts: no sync inside the step."""
    from dataclasses import replace

    from sparsefusion.runs.presets import resolve_config

    cfg = replace(resolve_config(f"{preset}-debug", []).model, vocab_size=256)
    torch.manual_seed(0)
    model = cfg.build()
    model.init_weights()
    model = model.to("cuda", torch.bfloat16)
    _, batch = _setup("grouped")
    batch["plan"] = model.build_plan(torch.randint(0, 2, (2, 64)))
    _assert_step_without_sync(model, batch)
