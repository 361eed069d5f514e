"""The flow image sampler: ``DiffusionSpanSampler.fill`` with diffusers' Euler scheduler, driven
by a stand-in model that predicts the exact velocity of a known Gaussian, samples that Gaussian;
guidance mixes velocities (scale 1 = no guidance); a sampler that does not fit the image loss is
refused naming both."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sparsefusion.generate.span_samplers import DiffusionSettings, DiffusionSpanSampler, OpenSpan
from sparsefusion.objectives.ddpm import NoiseSchedule
from sparsefusion.objectives.flow import FlowSchedule

pytest.importorskip("diffusers", reason="the transfusion extra is not installed")

SHAPE, K = (4, 8, 8), 2  # latent (Z, h, w) and patch side: n = 16 patches of C = 16 values
N_PATCHES = 16
SIGMA = 0.5


class _OracleDecoder:
    """Stands in for the model: row r's prediction is the exact velocity E[eps - x_0 | x_t] of
    x_0 ~ N(mu[r], SIGMA^2) per value, at the step's noisy patches and timestep t * T."""

    step_mode = "eager"  # the fill calls ``step`` once per pass

    def __init__(self, mu_R: list[float], T: int = 1000):
        self.batch, self.mu_R, self.T = len(mu_R), torch.tensor(mu_R, dtype=torch.float64), T
        self.timestep_dtypes: set[torch.dtype] = set()

    def step(self, ids, *, commit, span_ids, patches_PC, patch_slot_P, timestep_P):
        if commit:  # the clean pass: its prediction is not used
            return SimpleNamespace(predictions={"noise_PC": torch.zeros_like(patches_PC)})
        self.timestep_dtypes.add(timestep_P.dtype)
        t_P1 = (timestep_P.double() / self.T)[:, None]
        mu_P1 = self.mu_R[patch_slot_P // N_PATCHES][:, None]  # the step is N_PATCHES wide
        c, V = t_P1 - (1 - t_P1) * SIGMA**2, (1 - t_P1) ** 2 * SIGMA**2 + t_P1**2
        v_PC = -mu_P1 + c / V * (patches_PC.double() - (1 - t_P1) * mu_P1)
        return SimpleNamespace(predictions={"noise_PC": v_PC.float()})


def _sampler(schedule=None, **settings) -> DiffusionSpanSampler:
    tok = SimpleNamespace(latent_shape=SHAPE, patch_id=5, patches_per_image=lambda k: N_PATCHES)
    return DiffusionSpanSampler(tok, K, schedule or FlowSchedule(), DiffusionSettings(**settings))


def _samples(mu_R, num, guide_scale=None, steps=100) -> torch.Tensor:
    """``num`` images of rows 0..num-1 (guided by rows num..2num-1 when a scale is given)."""
    dec = _OracleDecoder(mu_R)
    spans = [
        OpenSpan(r, torch.Generator().manual_seed(r), span=0)
        if guide_scale is None
        else OpenSpan(r, torch.Generator().manual_seed(r), 0, guide=num + r, scale=guide_scale)
        for r in range(num)
    ]
    out = torch.stack(_sampler(steps=steps).fill(dec, spans))
    assert dec.timestep_dtypes == {torch.float32}  # t * T as a float
    return out


def test_euler_steps_on_the_exact_velocity_sample_the_gaussian():
    # 5,120 values: mean and std known to about 0.007 (1 sd); Euler's bias in the std is about
    # -0.07 at 10 steps and -0.002 at 100
    x = _samples([0.8] * 20, 20)
    assert abs(float(x.mean()) - 0.8) < 0.025 and abs(float(x.std()) - SIGMA) < 0.025
    coarse = _samples([0.8] * 20, 20, steps=10)
    assert float(coarse.std()) < float(x.std()) - 0.03  # the steps are Euler's (first order)
    one = _samples([0.8] * 20, 20, steps=1)  # one step from pure noise: x_0 = eps - v(eps, 1)
    assert abs(float(one.mean()) - 0.8) < 1e-5 and float(one.std()) < 1e-5


def test_guidance_mixes_velocities_and_scale_one_is_no_guidance():
    num, mu_c, mu_u = 20, 1.0, -0.5
    plain = _samples([mu_c] * num, num)
    same = _samples([mu_c] * num + [mu_u] * num, num, guide_scale=1.0)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)  # u + 1 * (c - u) = c
    guided = _samples([mu_c] * num + [mu_u] * num, num, guide_scale=2.0)
    # linear velocities: the guided field is the exact one of N(mu_u + s (mu_c - mu_u), SIGMA^2)
    assert abs(float(guided.mean()) - 2.5) < 0.025 and abs(float(guided.std()) - SIGMA) < 0.025


def test_a_sampler_that_does_not_fit_the_image_loss_is_refused():
    for sampler in ("ddim", "ddpm"):
        with pytest.raises(ValueError, match=f"sampler '{sampler}' .*objective.image_loss=flow"):
            _sampler(sampler=sampler)
        with pytest.raises(ValueError, match="objective.image_loss=flow"):
            FlowSchedule().scheduler(sampler, 4)
    with pytest.raises(ValueError, match="sampler 'euler' .*objective.image_loss=ddpm"):
        _sampler(NoiseSchedule(), sampler="euler")
    with pytest.raises(ValueError, match="sampler must be one of"):
        DiffusionSettings(sampler="heun")
    assert _sampler().sampler == "euler" and _sampler(NoiseSchedule()).sampler == "ddim"  # auto


def test_the_cli_offers_exactly_the_samplers_with_auto_first():
    from sparsefusion.cli.main import build_parser
    from sparsefusion.objectives.diffusion import SAMPLERS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    sampler = next(a for a in sub.choices["generate"]._actions if a.dest == "sampler")
    assert tuple(sampler.choices) == SAMPLERS and sampler.default == "auto" == SAMPLERS[0]
