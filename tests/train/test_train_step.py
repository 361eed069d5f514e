"""The forward-and-loss seam: checkpointing changes nothing, accumulation is token-weighted.

Each test here failed before the seams of issue 11: recomputation drew fresh Gumbel noise and
re-added router losses to a shared dict (selective checkpointing of token choice crashed), and
gradient accumulation averaged micro-batch means.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sparsefusion.data.batch import IGNORE_INDEX, Batch
from sparsefusion.distributed.mesh import DistEnv
from sparsefusion.distributed.parallelize import apply_activation_checkpointing
from sparsefusion.models.transformer import Transformer
from sparsefusion.objectives.base import ObjectiveConfig, build_objective
from sparsefusion.objectives.forward import forward_loss
from sparsefusion.runs.presets import resolve_config
from sparsefusion.train.step import accumulate_gradients

B, T, V = 4, 24, 97

SPARSE = {
    "expert-choice": ("moma-4t4i-debug", []),
    "expert-choice+gumbel": ("moma-4t4i-debug", ["model.moe.gumbel_noise=true"]),
    "token-choice": ("moe-8x-debug", ["model.moe.router=token_choice", "model.moe.top_k=2"]),
    "mod": ("mod-debug", []),
    "moma+mod": ("moma-4t4i-mod-debug", []),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(preset: str, overrides: list[str], seed: int = 0) -> Transformer:
    cfg = resolve_config(preset, [*overrides, f"model.vocab_size={V}"]).model
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights()
    return model


def _batch(seed: int = 0, rows: int = B, ignore_from: int | None = None) -> Batch:
    """Packed-like rows: two documents per row, image spans in the middle."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (rows, T), generator=g)
    modality = torch.zeros(rows, T, dtype=torch.long)
    modality[:, 5:15] = 1
    document = (torch.arange(T) >= 16).long().expand(rows, T).clone()
    position = torch.where(document == 0, torch.arange(T), torch.arange(T) - 16)
    targets = torch.roll(tokens, -1, 1)
    targets[:, 15] = IGNORE_INDEX  # document boundary
    targets[:, -1] = IGNORE_INDEX
    if ignore_from is not None:
        targets[:, ignore_from:] = IGNORE_INDEX
    tmod = torch.where(targets == IGNORE_INDEX, -1, torch.roll(modality, -1, 1))
    return Batch(tokens, targets, modality, tmod, position.contiguous(), document)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def _max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in a)


def _train_pass(model, objective, batch, seed: int):
    torch.manual_seed(seed)  # the Gumbel noise of the forward
    out = forward_loss(model, batch, objective)
    out.loss().backward()
    return out


@pytest.mark.parametrize("name", list(SPARSE))
def test_activation_checkpointing_changes_no_gradient_and_no_router_loss(name):
    preset, overrides = SPARSE[name]
    base = _model(preset, overrides)
    objective = build_objective(ObjectiveConfig(), base.cfg)
    batch = _batch(1)
    ref = _train_pass(base, objective, batch, seed=7)
    ref_grads = _grads(base)
    assert ref_grads and all(g.abs().sum() > 0 for k, g in ref_grads.items() if "router" in k)
    for mode in ("full", "selective"):
        model = copy.deepcopy(base)
        model.zero_grad(set_to_none=True)
        apply_activation_checkpointing(model, mode)
        out = _train_pass(model, objective, batch, seed=7)
        assert _max_rel(_grads(model), ref_grads) < 1e-6, mode
        assert out.model.aux_losses.keys() == ref.model.aux_losses.keys()
        for k, v in ref.model.aux_losses.items():  # logged router losses: not doubled
            torch.testing.assert_close(out.model.aux_losses[k], v, rtol=1e-6, atol=0)
        for k, v in ref.model.metrics.items():
            torch.testing.assert_close(out.model.metrics[k], v, rtol=1e-6, atol=1e-9)


def test_token_choice_router_losses_are_reported_once_under_full_checkpointing():
    model = _model(*SPARSE["token-choice"])
    objective = build_objective(ObjectiveConfig(), model.cfg)
    ref = forward_loss(model, _batch(2), objective).model.aux_losses
    apply_activation_checkpointing(model, "full")
    out = forward_loss(model, _batch(2), objective)
    out.loss().backward()  # the recompute happens here
    for k, v in ref.items():
        torch.testing.assert_close(out.model.aux_losses[k], v)


@pytest.mark.parametrize("preset", ["dense-debug", "mot-debug"])
def test_grad_accum_of_uneven_halves_equals_one_batch_of_all_rows(preset):
    first, second = _batch(3, rows=2, ignore_from=6), _batch(4, rows=2)  # 8 vs 42 targets
    whole = Batch(*(torch.cat([getattr(first, f), getattr(second, f)]) for f in _FIELDS))
    model = _model(preset, [])
    objective = build_objective(ObjectiveConfig(), model.cfg)
    assert objective.counts(first)["targets"] != objective.counts(second)["targets"]
    accumulate_gradients(model, [first, second], objective, env=DistEnv())
    accumulated = _grads(model)
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, [whole], objective, env=DistEnv())
    assert _max_rel(accumulated, _grads(model)) < 1e-6
    # What the trainer did before: the mean of the two micro-batches' own means.
    model.zero_grad(set_to_none=True)
    for b in (first, second):
        (forward_loss(model, b, objective).loss() / 2).backward()
    assert _max_rel(_grads(model), accumulated) > 1e-2


_FIELDS = ["tokens_BT", "targets_BT", "modality_BT", "target_modality_BT", "position_BT"]
_FIELDS += ["document_BT"]
