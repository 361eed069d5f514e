"""AdamW implementations: fused, foreach and the loop take the same steps; auto picks fused."""

from __future__ import annotations

import pytest
import torch

from sparsefusion.train.optim import OptimConfig, build_optimizer


def _trained(impl: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)
    )
    opt = build_optimizer(model, OptimConfig(lr=1e-2, impl=impl))
    for i in range(5):
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(i))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def test_implementations_agree_and_auto_is_fused_on_cpu():
    ref = _trained("for_loop")
    for impl in ("fused", "foreach", "auto"):
        for a, b in zip(ref, _trained(impl), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    opt = build_optimizer(torch.nn.Linear(2, 2), OptimConfig())
    assert opt.defaults["fused"] is True


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="optim.impl"):
        OptimConfig(impl="apex")
