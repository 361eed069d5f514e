"""The rectified-flow image process (flow matching), ``objective.image_loss=flow``.

An image's whole latent moves on the straight line from data to noise,
``x_t = (1 - t) x_0 + t eps`` with t in [0, 1] (t = 1: pure noise), and the model predicts the
velocity ``v = dx_t/dt = eps - x_0`` (rectified flow, Liu et al. arXiv 2209.03003; flow
matching, Lipman et al. arXiv 2210.02747; the convention of diffusers and SD3). The model's
timestep input is ``t * T`` (a float), so its sinusoidal features see the range DDPM's integer
steps give them. Training draws t from a logit-normal, ``t = sigmoid(m + s z)`` with z ~ N(0, 1)
(SD3, Esser et al. arXiv 2403.03206 section 3.1: more weight on the middle of the path);
validation uses the midpoints of ``G`` equal bins of [0, 1]. Sampling integrates
``dx/dt = v`` from t = 1 to t = 0 with Euler steps, ``x_{t'} = x_t + (t' - t) v``, by diffusers'
``FlowMatchEulerDiscreteScheduler`` (shift 1: evenly spaced t).

Shape legend: I = images, Z/h/w = latent channels and side, G = grid points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sparsefusion.objectives.diffusion import resolve_sampler


@dataclass(frozen=True)
class FlowSchedule:
    """The rectified-flow path a model is trained on, and that its image sampler must follow.

    Times are floats t in [0, 1]; the target is the velocity eps - x_0.

    Attributes:
        num_train_timesteps: T; the model's timestep input is t * T.
        logit_mean: m of the logit-normal training times.
        logit_std: s of the logit-normal training times.
        image_loss: the ``objective.image_loss`` name of this process.
        samplers: the diffusers samplers that reverse it (the first is the default).
    """

    num_train_timesteps: int = 1000
    logit_mean: float = 0.0
    logit_std: float = 1.0
    image_loss: ClassVar[str] = "flow"
    samplers: ClassVar[tuple[str, ...]] = ("euler",)

    def draw_timesteps(self, limit_I: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """t = (limit / T) * sigmoid(m + s z) per image (``limit_I``: at most T, in model
        timesteps; an early image's logit-normal is scaled into [0, noise_limit / T])."""
        z_I = torch.randn(limit_I.shape[0], generator=gen)
        u_I = torch.sigmoid(self.logit_mean + self.logit_std * z_I)
        return u_I * (limit_I.float() / self.num_train_timesteps)

    def grid(self, num: int) -> torch.Tensor:
        """``(g + 1/2) / num`` for g = 0..num-1: evenly spaced, strictly inside (0, 1)."""
        return (torch.arange(num, dtype=torch.float32) + 0.5) / num

    def fixed(self, t_I: torch.Tensor) -> torch.Tensor:
        """Given times (``Batch.timestep_I``: floats in [0, 1]) as this process's times."""
        return t_I.float()

    def noisy(self, x0_IZhw: torch.Tensor, eps_IZhw: torch.Tensor, t_I: torch.Tensor):
        """x_t = (1 - t) x_0 + t eps."""
        t = t_I.to(x0_IZhw).view((-1,) + (1,) * (x0_IZhw.dim() - 1))
        return (1 - t) * x0_IZhw + t * eps_IZhw

    def target(self, x0_IZhw: torch.Tensor, eps_IZhw: torch.Tensor, t_I: torch.Tensor):
        """What the model regresses: the velocity v = eps - x_0 (the same at every t)."""
        return eps_IZhw - x0_IZhw

    def clean_estimate(self, xt_IZhw: torch.Tensor, pred_IZhw: torch.Tensor, t_I: torch.Tensor):
        """x_0 = x_t - t v_hat: an error in v_hat reaches x_0 scaled by t (at most 1)."""
        t = t_I.to(xt_IZhw).view((-1,) + (1,) * (xt_IZhw.dim() - 1))
        return xt_IZhw - t * pred_IZhw

    def model_timestep(self, t_I: torch.Tensor) -> torch.Tensor:
        """The model's timestep input: t * T (float)."""
        return t_I.float() * self.num_train_timesteps

    def sampler_timestep(self, t: torch.Tensor) -> float:
        """The model's timestep input at a scheduler timestep (diffusers' is already sigma * T)."""
        return float(t)

    def scheduler(self, sampler: str, steps: int) -> Any:
        """diffusers' ``FlowMatchEulerDiscreteScheduler`` (``euler``) set to ``steps`` passes.

        Its sigmas run evenly from 1 to 1/T, then 0 (shift 1, no dynamic shifting); ``step``
        takes the predicted velocity. ``auto`` is ``euler``; another sampler is a ValueError.
        """
        from sparsefusion.tokenizers.image_vae import require_diffusers

        resolve_sampler(self, sampler)
        diffusers = require_diffusers()
        sched = diffusers.FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=self.num_train_timesteps, shift=1.0, use_dynamic_shifting=False
        )
        sched.set_timesteps(steps)
        return sched
