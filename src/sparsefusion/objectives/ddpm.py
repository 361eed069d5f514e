"""The DDPM image process (Ho et al., arXiv 2006.11239), ``objective.image_loss=ddpm``.

An image's whole latent is noised at an integer step t in [0, T),
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, and the model predicts the noise eps (its
regression target); the model's timestep input is t itself. Training draws t uniformly (below a
limit for images that precede their caption), validation uses a grid over [0, T - 1]. The
schedule (cosine, T = 1000) is diffusers' ``DDPMScheduler`` with
``beta_schedule="squaredcos_cap_v2"`` (Nichol & Dhariwal, arXiv 2102.09672); images are sampled
with its DDIM or DDPM scheduler.

Shape legend: I = images, Z/h/w = latent channels and side, T = train timesteps, G = grid points.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch

from sparsefusion.objectives.diffusion import resolve_sampler


def cosine_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2"
) -> torch.Tensor:
    """abar_t for t = 0..T-1 from diffusers' DDPMScheduler (float64 on the host)."""
    from sparsefusion.tokenizers.image_vae import require_diffusers

    diffusers = require_diffusers()
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule
    )
    return sched.alphas_cumprod.double()


def add_noise(
    x0_IZhw: torch.Tensor, noise_IZhw: torch.Tensor, t_I: torch.Tensor, abar_T: torch.Tensor
) -> torch.Tensor:
    """``sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` per image."""
    ab_I = abar_T.to(x0_IZhw.device)[t_I.to(x0_IZhw.device)].to(x0_IZhw.dtype)
    shape = (-1,) + (1,) * (x0_IZhw.dim() - 1)
    return ab_I.sqrt().view(shape) * x0_IZhw + (1 - ab_I).sqrt().view(shape) * noise_IZhw


@dataclass(frozen=True)
class NoiseSchedule:
    """The DDPM noise schedule a model is trained on, and that its image sampler must follow.

    Times are integer steps t in [0, T) (t = T - 1: almost pure noise); the target is the noise.

    Attributes:
        num_train_timesteps: T.
        beta_schedule: diffusers beta schedule (``squaredcos_cap_v2``: cosine).
        image_loss: the ``objective.image_loss`` name of this process.
        samplers: the diffusers samplers that reverse it (the first is the default).
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    image_loss: ClassVar[str] = "ddpm"
    samplers: ClassVar[tuple[str, ...]] = ("ddim", "ddpm")

    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t for t = 0..T-1 (float64 on the host)."""
        return cosine_alphas_cumprod(self.num_train_timesteps, self.beta_schedule)

    @cached_property
    def abar_T(self) -> torch.Tensor:
        """abar_t for t = 0..T-1 in float32 (what the training noise uses)."""
        return self.alphas_cumprod().float()

    def draw_timesteps(self, limit_I: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """t ~ U{0, ..., limit - 1} per image (``limit_I``: at most T, in model timesteps)."""
        u_I = torch.rand(limit_I.shape[0], generator=gen)
        return (u_I * limit_I).long().clamp_max(self.num_train_timesteps - 1)

    def grid(self, num: int) -> torch.Tensor:
        """``num`` evenly spaced integer steps over [0, T - 1] (validation)."""
        return torch.linspace(0, self.num_train_timesteps - 1, num).round().long()

    def fixed(self, t_I: torch.Tensor) -> torch.Tensor:
        """Given steps (``Batch.timestep_I``: integers in [0, T)) as this process's times."""
        return t_I.long()

    def noisy(self, x0_IZhw: torch.Tensor, eps_IZhw: torch.Tensor, t_I: torch.Tensor):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        return add_noise(x0_IZhw, eps_IZhw, t_I, self.abar_T)

    def target(self, x0_IZhw: torch.Tensor, eps_IZhw: torch.Tensor, t_I: torch.Tensor):
        """What the model regresses: the noise eps."""
        return eps_IZhw

    def clean_estimate(self, xt_IZhw: torch.Tensor, pred_IZhw: torch.Tensor, t_I: torch.Tensor):
        """x_0 = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t): an error in eps_hat grows by
        sqrt((1 - abar_t) / abar_t) in x_0 (about 34x at t = 980 of 1000 on the cosine schedule)."""
        ab_I = self.abar_T.to(xt_IZhw.device)[t_I.to(xt_IZhw.device)].to(xt_IZhw.dtype)
        ab = ab_I.view((-1,) + (1,) * (xt_IZhw.dim() - 1))
        return (xt_IZhw - (1 - ab).sqrt() * pred_IZhw) / ab.sqrt()

    def model_timestep(self, t_I: torch.Tensor) -> torch.Tensor:
        """The model's timestep input: the integer step t itself."""
        return t_I

    def sampler_timestep(self, t: torch.Tensor) -> int:
        """The model's timestep input at a scheduler timestep (an integer step)."""
        return int(t)

    def scheduler(self, sampler: str, steps: int) -> Any:
        """A diffusers ``ddim`` or ``ddpm`` scheduler on this schedule, set to ``steps`` passes.

        The model predicts the noise (epsilon); samples are not clipped. ``auto`` is ``ddim``;
        another sampler is a ValueError.
        """
        from sparsefusion.tokenizers.image_vae import require_diffusers

        sampler = resolve_sampler(self, sampler)
        diffusers = require_diffusers()
        cls = diffusers.DDIMScheduler if sampler == "ddim" else diffusers.DDPMScheduler
        sched = cls(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            clip_sample=False,
            prediction_type="epsilon",
        )
        sched.set_timesteps(steps)
        return sched
