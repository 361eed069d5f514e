"""The image processes the Transfusion objective can train on (``objective.image_loss``).

- ``ddpm`` (``objectives/ddpm.py: NoiseSchedule``): noise on the cosine schedule, the model
  predicts the noise; sampled with DDIM (default) or DDPM.
- ``flow`` (``objectives/flow.py: FlowSchedule``): rectified flow, the model predicts the
  velocity; sampled with Euler steps.

Both are a :class:`DiffusionSchedule`: how an image's time t is drawn (training), laid on a grid
(validation) or given (``Batch.timestep_I``), how a clean latent and noise at t become the
model's noisy input and its regression target, how t enters the model, and which diffusers
scheduler reverses the process. The objective and the image sampler use nothing else, so a
new process is one file and one entry in :data:`IMAGE_LOSSES`.

Shape legend: I = images, Z/h/w = latent channels and side, G = grid points.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from sparsefusion.objectives.base import ObjectiveConfig


class DiffusionSchedule(Protocol):
    """A diffusion process of continuous image latents (see the module doc).

    Attributes:
        num_train_timesteps: T; model timestep inputs lie in [0, T].
        image_loss: the ``objective.image_loss`` name of the process.
        samplers: the samplers that reverse it (the first is what ``auto`` picks).
    """

    num_train_timesteps: int
    image_loss: str
    samplers: tuple[str, ...]

    def draw_timesteps(self, limit_I: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """Training times, one per image, each below its limit (``limit_I``, model timesteps)."""
        ...

    def grid(self, num: int) -> torch.Tensor:
        """``num`` evenly spaced times (validation)."""
        ...

    def fixed(self, t_I: torch.Tensor) -> torch.Tensor:
        """Times given by a batch (``Batch.timestep_I``), in the process's own units."""
        ...

    def noisy(self, x0_IZhw: torch.Tensor, eps_IZhw: torch.Tensor, t_I: torch.Tensor):
        """x_t of clean latents x_0 and noise eps at times t."""
        ...

    def target(self, x0_IZhw: torch.Tensor, eps_IZhw: torch.Tensor, t_I: torch.Tensor):
        """What the model regresses at x_t (its ``noise_PC`` prediction)."""
        ...

    def clean_estimate(self, xt_IZhw: torch.Tensor, pred_IZhw: torch.Tensor, t_I: torch.Tensor):
        """The clean latent x_0 a prediction of the target at x_t implies (the exact x_0 when
        the prediction is the target)."""
        ...

    def model_timestep(self, t_I: torch.Tensor) -> torch.Tensor:
        """The model's timestep input at times t."""
        ...

    def sampler_timestep(self, t: torch.Tensor) -> int | float:
        """The model's timestep input at a timestep of :meth:`scheduler`."""
        ...

    def scheduler(self, sampler: str, steps: int) -> Any:
        """A diffusers scheduler for ``sampler`` (or ``auto``) set to ``steps`` passes."""
        ...


SAMPLERS = ("auto", "ddim", "ddpm", "euler")


def resolve_sampler(schedule: DiffusionSchedule, sampler: str) -> str:
    """``sampler`` if it reverses ``schedule`` (``auto``: the schedule's first), else ValueError."""
    if sampler == "auto":
        return schedule.samplers[0]
    if sampler not in schedule.samplers:
        raise ValueError(
            f"sampler {sampler!r} does not fit objective.image_loss={schedule.image_loss} "
            f"(it samples with {' or '.join(schedule.samplers)}; 'auto' picks "
            f"{schedule.samplers[0]})"
        )
    return sampler


def _ddpm(cfg: ObjectiveConfig) -> DiffusionSchedule:
    from sparsefusion.objectives.ddpm import NoiseSchedule

    return NoiseSchedule(cfg.num_train_timesteps, cfg.beta_schedule)


def _flow(cfg: ObjectiveConfig) -> DiffusionSchedule:
    from sparsefusion.objectives.flow import FlowSchedule

    return FlowSchedule(cfg.num_train_timesteps, cfg.flow_logit_mean, cfg.flow_logit_std)


IMAGE_LOSSES: dict[str, Callable[[ObjectiveConfig], DiffusionSchedule]] = {
    "ddpm": _ddpm,
    "flow": _flow,
}


def build_schedule(cfg: ObjectiveConfig) -> DiffusionSchedule:
    """The process named by ``cfg.image_loss``, with its settings from ``cfg``."""
    return IMAGE_LOSSES[cfg.image_loss](cfg)


def check_sampler(cfg: ObjectiveConfig, sampler: str) -> None:
    """ValueError when ``sampler`` cannot sample a run's images (a run whose objective has no
    diffusion part samples no latents: nothing to check). Cheap: commands call it before
    loading a model."""
    if cfg.name == "transfusion":
        resolve_sampler(build_schedule(cfg), sampler)
