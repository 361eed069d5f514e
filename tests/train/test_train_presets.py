"""Sparse presets are FLOPs-matched to dense, attention included."""

import pytest
import torch

from sparsefusion.models.flops import train_flops
from sparsefusion.models.inputs import plan_for
from sparsefusion.runs.presets import resolve_config


@pytest.mark.parametrize("preset", ["mod", "moma-4t4i-mod", "moma-4t4i", "moe-8x"])
def test_demo_sparse_presets_cost_what_dense_costs(preset):
    dense = resolve_config("dense", ["model.vocab_size=4096"]).model
    sparse = resolve_config(preset, ["model.vocab_size=4096"]).model
    B, T = 8, 512
    document = (torch.arange(T) // 90).expand(B, T)  # the built-in corpus' document length
    modality = torch.zeros(B, T, dtype=torch.long)
    modality[:, ::2] = 1
    plan = plan_for(sparse.tower_of_modality, sparse.num_towers, modality)
    ratio = train_flops(sparse, document, tower_counts=plan.counts) / train_flops(dense, document)
    assert abs(ratio - 1) < 0.005, ratio
