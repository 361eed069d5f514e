"""Activation checkpointing and compile apply to every block of ``model.layers``; config checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from sparsefusion.distributed.mesh import DistEnv
from sparsefusion.distributed.parallelize import DistConfig, parallelize_model, unwrap
from sparsefusion.models.inputs import ModelInputs
from sparsefusion.models.transformer import ModelConfig, Transformer
from sparsefusion.nn.routing import build_plan

B, T, V = 2, 12, 64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread avoids OpenMP spin-waits on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(arch: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch=arch, vocab_size=V, dim=32, num_layers=3, num_heads=4))
    model.init_weights()
    return model


def _loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    modality = torch.randint(0, 2, (B, T), generator=gen)
    towers = unwrap(model).cfg.tower_of_modality
    out = model(
        ModelInputs(
            tokens,
            position_BT=torch.arange(T).expand(B, T),
            document_BT=torch.zeros(B, T, dtype=torch.long),
            plan=build_plan(torch.tensor(towers)[modality.reshape(-1)], max(towers) + 1),
        )
    )
    loss = out.logits_BTV.float().logsumexp(-1).mean()
    loss.backward()
    grads = {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
        for n, p in model.named_parameters()
    }
    return loss.detach(), grads


def _counting(forward, calls: list[int], i: int):
    def counted(*args, **kwargs):
        calls[i] += 1
        return forward(*args, **kwargs)

    return counted


@pytest.mark.parametrize("arch", ["dense", "mot"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_wraps_and_recomputes_every_block(arch: str, mode: str):
    plain = _model(arch)
    wrapped = parallelize_model(
        copy.deepcopy(plain), DistConfig(activation_checkpointing=mode), DistEnv()
    )
    assert all(isinstance(layer, CheckpointWrapper) for layer in wrapped.layers)
    calls = [0] * len(wrapped.layers)
    for i, layer in enumerate(wrapped.layers):
        inner = layer._checkpoint_wrapped_module
        inner.forward = _counting(inner.forward, calls, i)
    loss_ref, grads_ref = _loss_and_grads(plain)
    loss, grads = _loss_and_grads(wrapped)
    # Each block ran once forward and once more when backward recomputed it.
    assert calls == [2] * len(wrapped.layers)
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-7)
    # Parameter names seen by checkpoints do not change.
    assert wrapped.state_dict().keys() == plain.state_dict().keys()


def test_compile_applies_in_place_to_every_block():
    model = parallelize_model(_model("mot"), DistConfig(compile=True), DistEnv())
    assert all(layer._compiled_call_impl is not None for layer in model.layers)
    assert model.state_dict().keys() == _model("mot").state_dict().keys()


def test_single_process_ignores_strategy_and_unwrap_is_identity():
    model = _model("dense")
    assert parallelize_model(model, DistConfig(strategy="fsdp"), DistEnv()) is model
    assert unwrap(model) is model


@pytest.mark.parametrize(
    "key, value",
    [("strategy", "zero3"), ("activation_checkpointing", "some"), ("mixed_precision", "fp8")],
)
def test_dist_config_rejects_unknown_choices(key: str, value: str):
    with pytest.raises(ValueError, match=f"dist.{key}"):
        DistConfig(**{key: value})


def test_mixed_precision_defaults():
    cfg = DistConfig()
    assert cfg.param_dtype(torch.device("cpu")) == torch.float32
    assert cfg.param_dtype(torch.device("cuda")) == torch.bfloat16
    assert DistConfig(mixed_precision="fp32").param_dtype(torch.device("cuda")) == torch.float32
