"""Analytic FLOPs vs torch's FLOP counter; parameter counts; presets."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sparsefusion.models.flops import (
    active_params_per_token,
    attended_pairs,
    num_params,
    train_flops,
)
from sparsefusion.models.inputs import ModelInputs
from sparsefusion.models.presets import MODEL_SIZES, model_size, preset_config
from sparsefusion.models.transformer import ModelConfig
from sparsefusion.nn.attention import build_attention_mask
from sparsefusion.nn.routing import build_plan


@pytest.mark.parametrize(
    "kw",
    [dict(arch="dense"), dict(arch="mot"), dict(arch="mot", num_kv_heads=2, norm_placement="pre")],
)
def test_train_flops_match_flop_counter(kw):
    # The CPU SDPA kernel is not counted by FlopCounterMode: force the math path (bmm, counted).
    cfg = ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=2,
        num_heads=4,
        multiple_of=8,
        linear_impl="reference",
        **kw,
    )
    model = cfg.build()
    torch.manual_seed(0)
    model.init_weights()
    B, T = 2, 16
    tokens = torch.randint(0, 64, (B, T))
    modality = torch.randint(0, 2, (B, T))
    document = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    position = torch.tensor([list(range(6)) + list(range(10)), list(range(16))])
    plan = build_plan(torch.tensor(cfg.tower_of_modality)[modality].reshape(-1), cfg.num_towers)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(ModelInputs(tokens, position_BT=position, document_BT=document, plan=plan))
        out.logits_BTV.square().mean().backward()
    measured = counter.get_total_flops()
    expected = train_flops(cfg, document, dense_attention=True)
    assert measured == expected, (measured, expected)
    # Causal in-document attention counts fewer pairs than the dense mask computes.
    assert train_flops(cfg, document) < expected


def test_attended_pairs_equal_mask_count():
    document = torch.tensor(
        [[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0], [3, 3, 5, 5, 5, 5, 5, 5]]
    )
    mask = build_attention_mask(document).allowed_B1TT
    assert attended_pairs(document) == int(mask.sum()) == (6 + 3 + 6) + 36 + (3 + 21)
    assert attended_pairs(document, dense_attention=True) == 3 * 8 * 8
    # Rows ending and starting with the same document id are still separate documents.
    same_ids = torch.zeros(2, 4, dtype=torch.long)
    assert attended_pairs(same_ids) == 2 * 10


def test_num_params_and_active_params():
    cfg = ModelConfig(vocab_size=50, dim=32, num_layers=3, num_heads=4, num_kv_heads=2)
    mot, dense = cfg.build(), replace(cfg, arch="dense").build()
    for model in (mot, dense):
        assert num_params(model) == sum(p.numel() for p in model.parameters())
    norms = sum(p.numel() for n, p in dense.named_parameters() if "norm" in n)
    embedding = dense.embedding.weight.numel()
    assert active_params_per_token(cfg) == num_params(dense) - norms - embedding
    assert num_params(dense, exclude_embedding=True) == num_params(dense) - embedding
    # MoT: every tower component doubles; active parameters per token are those of dense.
    tower_params = num_params(dense) - embedding - dense.output.weight.numel() - 32
    assert num_params(mot) == num_params(dense) + tower_params


def test_presets_build_and_match_paper_sizes():
    for name in MODEL_SIZES:
        cfg = preset_config(name, vocab_size=65536)
        assert cfg.dim == model_size(name)["dim"]
    with pytest.raises(ValueError, match="debug"):
        model_size("nope")
    # MoT "37M" and "443M" are activated params incl. untied embedding and head (V = 65,536).
    for name, millions in [("small", 37), ("94m", 94), ("443m", 443), ("7b", 7000)]:
        cfg = preset_config(name, vocab_size=65536, arch="dense")
        total = active_params_per_token(cfg) + 65536 * cfg.dim
        assert abs(total / 1e6 - millions) / millions < 0.03, (name, total)
    assert model_size("debug") is not model_size("debug")
    # The benchmark's reference shape: about 545M non-embedding parameters.
    cfg = preset_config("bench-545m", vocab_size=65536, arch="dense")
    non_embedding = active_params_per_token(cfg) - 65536 * cfg.dim  # less the output head
    assert 530e6 < non_embedding < 550e6, non_embedding
