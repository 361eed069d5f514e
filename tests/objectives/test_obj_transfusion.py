"""The Transfusion objective: cosine schedule, noising, per-image loss, packed == unpacked."""

from __future__ import annotations

import math

import pytest
import torch

from sparsefusion.data.batch import IGNORE_INDEX, Batch
from sparsefusion.models.transformer import ModelConfig, ModelOutput
from sparsefusion.objectives.base import ObjectiveConfig, build_objective
from sparsefusion.objectives.transfusion import add_noise, cosine_alphas_cumprod

pytest.importorskip("diffusers", reason="the transfusion extra is not installed")

T_STEPS = 1000


def _f(t: float, s: float = 0.008) -> float:
    """Nichol & Dhariwal's cosine alpha-bar before normalisation."""
    return math.cos((t / T_STEPS + s) / (1 + s) * math.pi / 2) ** 2


def test_cosine_schedule_matches_the_formula_at_both_ends():
    abar = cosine_alphas_cumprod(T_STEPS)
    assert abar.shape == (T_STEPS,)
    # Index t holds abar after t + 1 noising steps: f(t + 1) / f(0).
    for t in (0, 1, 500, T_STEPS - 2):
        assert math.isclose(float(abar[t]), _f(t + 1) / _f(0), rel_tol=1e-6), t
    assert float(abar[T_STEPS - 1]) < 1e-6  # f(T) = 0: pure noise at the end (beta capped)
    assert bool((abar[1:] < abar[:-1]).all())


def test_noising_then_the_exact_epsilon_recovers_x0():
    abar = cosine_alphas_cumprod(T_STEPS).double()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 990])
    xt = add_noise(x0, eps, t, abar)
    ab = abar[t].view(-1, 1, 1, 1)
    torch.testing.assert_close((xt - (1 - ab).sqrt() * eps) / ab.sqrt(), x0)
    assert not torch.allclose(xt, x0)


def _model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=32, dim=32, num_layers=1, num_heads=4, multiple_of=8)
    return ModelConfig(**{**base, "latent_channels": 2, "patch_size": 2, **kw})


def _batch(num_images: int = 3, early: bool = False, seed: int = 0) -> Batch:
    """One row per image: [BOS, BOI, 4 patches, EOI, text]; latents 2x4x4 -> 4 patches."""
    rows = num_images
    T = 8
    tokens = torch.tensor([[1, 3, 20, 20, 20, 20, 4, 17]] * rows)
    modality = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0]] * rows)
    targets = torch.full((rows, T), IGNORE_INDEX)
    targets[:, 0], targets[:, 6] = 3, 17
    g = torch.Generator().manual_seed(seed)
    return Batch(
        tokens_BT=tokens,
        targets_BT=targets,
        modality_BT=modality,
        target_modality_BT=torch.where(targets != IGNORE_INDEX, 0, -1),
        position_BT=torch.arange(T).expand(rows, T).clone(),
        document_BT=torch.zeros(rows, T, dtype=torch.long),
        span_BT=torch.where(modality == 1, 0, -1),
        latents_IZhw=torch.randn(num_images, 2, 4, 4, generator=g),
        image_slot_I=torch.arange(num_images) * T + 2,
        image_early_I=torch.full((num_images,), early),
    )


def _objective(**kw):
    return build_objective(ObjectiveConfig(name="transfusion", **kw), _model_cfg())


def test_exact_noise_prediction_has_zero_image_loss_and_zero_prediction_about_one():
    obj, batch = _objective(), _batch(num_images=64)
    inputs = obj.prepare(batch, generator=torch.Generator().manual_seed(1))
    assert inputs.patches_PC.shape == (64 * 4, 8) and inputs.timestep_P.shape == (64 * 4,)
    assert bool((inputs.tokens_BT.reshape(-1)[inputs.patch_slot_P] == 20).all())
    logits = torch.zeros(64, 8, 32)
    exact = obj.loss(ModelOutput(logits, {"noise_PC": inputs.noise_PC}), batch, inputs)
    zero = obj.loss(
        ModelOutput(logits, {"noise_PC": torch.zeros_like(inputs.noise_PC)}), batch, inputs
    )
    assert float(exact.terms["diffusion"].total) == 0.0
    s, c = zero.logged["loss/image"]
    assert int(c) == 64 and abs(float(s) / 64 - 1.0) < 0.15  # E[eps^2] = 1, per image
    assert exact.terms["diffusion"].weight == 5.0 and exact.terms["diffusion"].count == "images"
    text_sum, n_text = exact.logged["loss/text"]
    assert int(n_text) == 128 and math.isclose(float(text_sum) / 128, math.log(32), rel_tol=1e-5)


def test_images_before_their_caption_are_noised_at_most_to_the_limit():
    obj = _objective()
    late = obj.timesteps(_batch(num_images=400, early=False), torch.Generator().manual_seed(0))
    early = obj.timesteps(_batch(num_images=400, early=True), torch.Generator().manual_seed(0))
    assert int(early.max()) < 500 and int(late.max()) >= 500
    assert int(late.min()) >= 0 and int(late.max()) <= 999


def test_validation_batches_use_a_fixed_grid_and_fixed_noise():
    obj = _objective(val_timesteps=4)
    batch = _batch(num_images=6)
    batch.noise_seed = 7
    a, b = obj.prepare(batch), obj.prepare(batch, generator=torch.Generator().manual_seed(99))
    torch.testing.assert_close(a.patches_PC, b.patches_PC)
    t_I = a.timestep_P.view(6, 4)[:, 0]
    assert t_I.tolist() == [0, 333, 666, 999, 0, 333]
    batch.noise_seed = 8
    assert not torch.allclose(obj.prepare(batch).patches_PC, a.patches_PC)


def test_transfusion_needs_latents_in_the_model():

    with pytest.raises(ValueError, match="tokenizer.image_kind=vae"):
        build_objective(ObjectiveConfig(name="transfusion"), _model_cfg(latent_channels=0))
