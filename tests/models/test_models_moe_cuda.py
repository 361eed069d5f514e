"""CUDA checks of the sparse layers: expert choice and MoD on the GPU equal the CPU (fp32)."""

from __future__ import annotations

import pytest
import torch

from sparsefusion.models.inputs import ModelInputs
from sparsefusion.models.transformer import ModelConfig
from sparsefusion.nn.mod import MoDConfig
from sparsefusion.nn.moe import MoEConfig

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_moma_mod_cuda_matches_cpu(router):
    cfg = ModelConfig(
        vocab_size=128,
        dim=64,
        num_layers=3,
        num_heads=4,
        arch="moma",
        moe=MoEConfig(experts={"text": 4, "image": 2}, router=router),
        mod=MoDConfig(enabled=True, capacity=0.5),
    )
    torch.manual_seed(0)
    model = cfg.build()
    model.init_weights()
    with torch.no_grad():  # decisive router scores: device rounding must not flip a top-k
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(std=1.0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (2, 32), generator=g)
    modality = torch.randint(0, 2, (2, 32), generator=g)
    document = torch.zeros(2, 32, dtype=torch.long)
    position = torch.arange(32).expand(2, 32).clone()
    outs = []
    for device in ("cpu", "cuda"):
        m = model.to(device)
        plan = m.build_plan(modality)
        out = m(
            ModelInputs(
                tokens.to(device),
                position_BT=position.to(device),
                document_BT=document.to(device),
                plan=plan,
            )
        )
        outs.append(out.logits_BTV.cpu())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-3, atol=1e-3)
