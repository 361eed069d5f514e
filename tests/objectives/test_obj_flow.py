"""The flow-matching image loss (``objective.image_loss=flow``): the path and its velocity, the
loss at the analytic optimum of a Gaussian toy problem, logit-normal times (limited for early
images), the validation grid, and bad settings refused naming the key."""

from __future__ import annotations

import math

import pytest
import torch

from sparsefusion.config import ConfigError, merge, parse_overrides
from sparsefusion.data.batch import IGNORE_INDEX, Batch
from sparsefusion.models.transformer import ModelConfig, ModelOutput
from sparsefusion.objectives.base import ObjectiveConfig, build_objective
from sparsefusion.runs.config import TrainConfig

pytest.importorskip("diffusers", reason="the transfusion extra is not installed")


def _model() -> ModelConfig:
    return ModelConfig(
        vocab_size=32, dim=32, num_layers=1, num_heads=4, multiple_of=8, latent_channels=2,
        patch_size=2,
    )  # fmt: skip


def _objective(**kw):
    return build_objective(ObjectiveConfig(name="transfusion", image_loss="flow", **kw), _model())


def _batch(latents_IZhw: torch.Tensor, early: bool = False) -> Batch:
    """One row per image: [BOS, BOI, 4 patches, EOI, text]; latents (I, 2, 4, 4) -> 4 patches."""
    I, T = latents_IZhw.shape[0], 8
    tokens = torch.tensor([[1, 3, 20, 20, 20, 20, 4, 17]] * I)
    modality = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0]] * I)
    targets = torch.full((I, T), IGNORE_INDEX)
    targets[:, 0], targets[:, 6] = 3, 17
    return Batch(
        tokens_BT=tokens,
        targets_BT=targets,
        modality_BT=modality,
        target_modality_BT=torch.where(targets != IGNORE_INDEX, 0, -1),
        position_BT=torch.arange(T).expand(I, T).clone(),
        document_BT=torch.zeros(I, T, dtype=torch.long),
        span_BT=torch.where(modality == 1, 0, -1),
        latents_IZhw=latents_IZhw,
        image_slot_I=torch.arange(I) * T + 2,
        image_early_I=torch.full((I,), early),
    )


def _image_loss(obj, batch, inputs, pred_PC) -> float:
    logits = torch.zeros(*batch.tokens_BT.shape, 32)
    s, c = obj.loss(ModelOutput(logits, {"noise_PC": pred_PC}), batch, inputs).logged["loss/image"]
    return float(s) / int(c)


def test_prepare_noises_on_the_straight_path_and_targets_the_velocity():
    obj = _objective()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    batch = _batch(x0)
    batch.timestep_I, batch.noise_IZhw = torch.tensor([0.0, 0.25, 1.0]), eps
    inputs = obj.prepare(batch)
    t = batch.timestep_I.view(3, 1, 1, 1)
    xt_PC = ((1 - t) * x0 + t * eps).reshape(3, 2, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5)
    torch.testing.assert_close(inputs.patches_PC, xt_PC.reshape(12, 8))
    v_PC = (eps - x0).reshape(3, 2, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(12, 8)
    torch.testing.assert_close(inputs.target_PC, v_PC)
    assert inputs.timestep_P.dtype == torch.float32
    assert inputs.timestep_P.tolist() == [0.0] * 4 + [250.0] * 4 + [1000.0] * 4  # t * T


@pytest.mark.parametrize("t", [0.1, 0.5, 0.85])
def test_loss_at_the_analytic_optimum_of_a_gaussian(t):
    """x0 ~ N(mu, sigma^2) per value: E[v | x_t] = -mu + c / V (x_t - (1 - t) mu) with
    c = t - (1 - t) sigma^2, V = (1 - t)^2 sigma^2 + t^2; its MSE is 1 + sigma^2 - c^2 / V."""
    mu, sigma, I = 0.7, 0.5, 2000  # 64,000 values: the MSE is known to about 0.6% (1 sd)
    obj = _objective()
    g = torch.Generator().manual_seed(1)
    batch = _batch(mu + sigma * torch.randn(I, 2, 4, 4, generator=g))
    batch.timestep_I = torch.full((I,), t)
    inputs = obj.prepare(batch, generator=g)
    c, V = t - (1 - t) * sigma**2, (1 - t) ** 2 * sigma**2 + t**2
    oracle_PC = -mu + c / V * (inputs.patches_PC - (1 - t) * mu)
    got, want = _image_loss(obj, batch, inputs, oracle_PC), 1 + sigma**2 - c**2 / V
    assert math.isclose(got, want, rel_tol=0.03), (got, want)
    # the oracle beats a predictor that ignores x_t (-mu: the MSE is Var(v) = 1 + sigma^2)
    blind = _image_loss(obj, batch, inputs, torch.full_like(oracle_PC, -mu))
    assert math.isclose(blind, 1 + sigma**2, rel_tol=0.03) and got < blind - 0.5 * c**2 / V
    assert _image_loss(obj, batch, inputs, inputs.target_PC) == 0.0  # the exact velocity


def test_training_times_are_logit_normal_and_limited_for_early_images():
    obj = _objective(flow_logit_mean=0.5, flow_logit_std=0.8, noise_limit=300)
    x0 = torch.zeros(4000, 2, 4, 4)
    late = obj.timesteps(_batch(x0), torch.Generator().manual_seed(0))
    early = obj.timesteps(_batch(x0, early=True), torch.Generator().manual_seed(0))
    assert late.dtype == torch.float32 and bool(((late > 0) & (late < 1)).all())
    logit = torch.logit(late.double())
    assert abs(float(logit.mean()) - 0.5) < 0.05 and abs(float(logit.std()) - 0.8) < 0.05
    torch.testing.assert_close(early, late * 0.3)  # the same draw, scaled into [0, 300 / 1000]


def test_validation_uses_midpoints_strictly_inside_and_fixed_noise():
    obj = _objective(val_timesteps=4)
    batch = _batch(torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(0)))
    batch.noise_seed = 7
    a, b = obj.prepare(batch), obj.prepare(batch, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a.patches_PC, b.patches_PC)
    assert a.timestep_P.view(6, 4)[:, 0].tolist() == [125.0, 375.0, 625.0, 875.0, 125.0, 375.0]


@pytest.mark.parametrize(
    "override, match",
    [
        ("objective.image_loss=fm", r"objective\.image_loss must be one of \['ddpm', 'flow'\]"),
        ("objective.flow_logit_std=0", r"objective\.flow_logit_std must be finite and > 0"),
        ("objective.flow_logit_std=-1.0", r"objective\.flow_logit_std"),
        ("objective.flow_logit_std=.inf", r"objective\.flow_logit_std"),
        ("objective.flow_logit_mean=.nan", r"objective\.flow_logit_mean"),
    ],
)
def test_bad_flow_settings_are_refused_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        merge(TrainConfig(), parse_overrides([override]))
    key, value = override.removeprefix("objective.").split("=")
    bad = value if key == "image_loss" else float(value.lstrip("."))  # YAML .inf/.nan
    with pytest.raises(ValueError, match=match):
        ObjectiveConfig(name="transfusion", **{key: bad})


def test_the_default_image_loss_is_ddpm():
    assert ObjectiveConfig().image_loss == "ddpm"
    obj = build_objective(ObjectiveConfig(name="transfusion"), _model())
    assert obj.noise_schedule.image_loss == "ddpm"


@pytest.mark.parametrize("image_loss", ["ddpm", "flow"])
def test_clean_estimate_inverts_the_path_and_scales_errors_as_documented(image_loss):
    """Given the exact target, ``clean_estimate`` returns x_0; an error e in the prediction
    moves x_0 by -e * sqrt((1 - abar) / abar) (ddpm) or -e * t (flow)."""
    obj = build_objective(ObjectiveConfig(name="transfusion", image_loss=image_loss), _model())
    process = obj.noise_schedule
    x0 = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    t_I = process.grid(5)[:4]  # ddpm: the last grid point (abar 2e-9) only amplifies rounding
    xt = process.noisy(x0, eps, t_I)
    target = process.target(x0, eps, t_I)
    torch.testing.assert_close(process.clean_estimate(xt, target, t_I), x0, atol=1e-4, rtol=0)
    moved_I = (process.clean_estimate(xt, target + 0.01, t_I) - x0).mean(dim=(1, 2, 3))
    if image_loss == "flow":
        scale_I = t_I
    else:
        ab_I = process.abar_T[t_I].double()
        scale_I = ((1 - ab_I) / ab_I).sqrt().float()
    torch.testing.assert_close(moved_I, -0.01 * scale_I, rtol=1e-3, atol=1e-5)
