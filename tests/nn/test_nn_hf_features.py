"""Switches added for imported LLMs: per-tower bias, tied output head, llama3 RoPE scaling."""

from __future__ import annotations

import pytest
import torch

from sparsefusion.models.transformer import ModelConfig, Transformer
from sparsefusion.nn.rope import RopeScalingConfig, rope_angles
from sparsefusion.nn.routing import build_plan
from sparsefusion.nn.tower_linear import TowerLinear


@pytest.mark.parametrize("impl", ["grouped", "reference"])
@pytest.mark.parametrize("towers", [1, 3])
def test_tower_bias_adds_each_positions_tower_bias(impl, towers):
    torch.manual_seed(0)
    groups = torch.tensor([0, 2, 1, 0, 2, 2, 1, 0]) % towers
    plan = build_plan(groups, towers)
    layer = TowerLinear(8, 12, towers, impl, bias=True)
    layer.init_weights(0.5)
    with torch.no_grad():
        layer.bias.normal_()
    x_N8 = torch.randn(8, 8)
    y_sorted = layer(plan.sort(x_N8), plan)
    y = plan.unsort(y_sorted)
    want = torch.stack(
        [x_N8[i] @ layer.weight[g].T + layer.bias[g] for i, g in enumerate(groups.tolist())]
    )
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert layer.bias.grad is not None


def test_default_linear_has_no_bias_parameter():
    assert [n for n, _ in TowerLinear(4, 4, 2).named_parameters()] == ["weight"]


def test_tied_head_reads_the_embedding_and_is_stored_once():
    cfg = ModelConfig(
        arch="mot", vocab_size=64, dim=32, num_layers=1, num_heads=2, tie_embeddings=True
    )
    model = Transformer(cfg)
    model.init_weights()
    assert "output.weight" not in model.state_dict()
    assert model.output.weight is model.embedding.weight
    names = [n for n, _ in model.named_parameters()]
    assert names.count("embedding.weight") == 1 and not any(n.startswith("output") for n in names)


def test_rope_scaling_none_is_plain_rope_and_llama3_changes_low_frequencies():
    pos = torch.arange(64).view(1, 64)
    plain = rope_angles(pos, 16, 500000.0)
    same = rope_angles(pos, 16, 500000.0, RopeScalingConfig())
    assert torch.equal(plain.cos_BTF, same.cos_BTF)
    llama3 = RopeScalingConfig(kind="llama3", original_max_position=32)
    scaled = rope_angles(pos, 16, 500000.0, llama3)
    assert torch.equal(scaled.cos_BTF[..., 0], plain.cos_BTF[..., 0])  # highest frequency kept
    assert not torch.equal(scaled.cos_BTF[..., -1], plain.cos_BTF[..., -1])
