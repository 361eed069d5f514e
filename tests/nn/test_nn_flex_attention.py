"""FlexAttention backend: the same rule as the dense SDPA mask (CPU forward; GPU backward)."""

from __future__ import annotations

import pytest
import torch

from sparsefusion.models.inputs import ModelInputs
from sparsefusion.models.transformer import ModelConfig
from sparsefusion.nn.attention import build_attention_mask, sdpa
from sparsefusion.nn.mod import MoDConfig

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _layout(T: int = 40, device: str = "cpu"):
    document = torch.zeros(2, T, dtype=torch.long)
    document[0, 13:] = 1
    document[0, 30:] = 2
    document[1, 25:] = 1
    span = torch.full((2, T), -1)
    span[0, 15:22] = 0  # a bidirectional image span inside document 1
    span[1, 5:12] = 3
    position = torch.arange(T).expand(2, T).clone()
    position[0, 13:] -= 13
    position[0, 30:] -= 17
    position[1, 25:] -= 25
    return document.to(device), span.to(device), position.to(device)


@pytest.mark.parametrize("with_spans", [False, True])
def test_flex_attention_equals_dense_mask(with_spans):
    document, span, _ = _layout()
    span = span if with_spans else None
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 40, 8, generator=g)
    k, v = torch.randn(2, 2, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g)  # GQA
    dense = sdpa(q, k, v, build_attention_mask(document, span, "sdpa"))
    flex = sdpa(q, k, v, build_attention_mask(document, span, "flex"))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def _model_pair(device: str, **kw):
    base = dict(vocab_size=97, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, **kw)
    models = []
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        m = ModelConfig(attention_backend=backend, **base).build()
        m.init_weights()
        models.append(m.to(device))
    return models


def _inputs(model, device: str):
    document, span, position = _layout(device=device)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (2, 40), generator=g).to(device)
    modality = torch.randint(0, 2, (2, 40), generator=g)
    plan = model.build_plan(modality)
    return dict(position_BT=position, document_BT=document, span_BT=span, plan=plan), tokens


@pytest.mark.parametrize(
    "kw",
    [dict(arch="dense"), dict(arch="mot"), dict(arch="mot", mod=MoDConfig(enabled=True))],
    ids=["dense", "mot", "mot-mod"],
)
def test_flex_model_forward_equals_sdpa(kw):
    sdpa_model, flex_model = _model_pair("cpu", **kw)
    batch, tokens = _inputs(sdpa_model, "cpu")
    with torch.no_grad():
        ref = sdpa_model(ModelInputs(tokens, **batch)).logits_BTV
        out = flex_model(ModelInputs(tokens, **batch)).logits_BTV
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="attention_backend"):
        ModelConfig(vocab_size=97, attention_backend="xformers")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs CUDA")
def test_cuda_flex_training_step_equals_sdpa():
    sdpa_model, flex_model = _model_pair("cuda", arch="mot", mod=MoDConfig(enabled=True))
    batch, tokens = _inputs(sdpa_model, "cuda")
    for model in (sdpa_model, flex_model):
        model(ModelInputs(tokens, **batch)).logits_BTV.square().mean().backward()
    for (name, p_s), p_f in zip(
        sdpa_model.named_parameters(), flex_model.parameters(), strict=True
    ):
        torch.testing.assert_close(p_f.grad, p_s.grad, atol=1e-4, rtol=1e-3, msg=name)
