"""The objective seam: how a batch becomes model inputs, and model outputs become a loss.

An objective has two steps. ``prepare(batch)`` builds the model's inputs from a packed batch
(the tower plan; for diffusion also noise and timesteps). ``loss(output, batch, inputs)`` turns
the model's outputs into :class:`ObjectiveOutput`: differentiable loss SUMS, each with the name
of the count that normalises it, and detached (sum, count) pairs to log. Keeping sums and counts
apart is what makes gradient accumulation token-weighted: the trainer divides every sum by its
count over the whole global batch (all micro-batches, all ranks), known on the host before any
backward, so ``grad_accum=2`` equals one batch of twice the rows. The trainer's logging window,
validation, ``train-aux``, ``eval`` and the benchmark consume this output generically; a new
objective is one file registered here.

Objectives are looked up by ``objective.name`` in :data:`OBJECTIVES`. An entry also declares
what it needs from the data: the image representation it trains on (``image_kind``: ``vq``
codes or ``vae`` latents; ``tokenizer.image_kind`` follows it) and whether image-caption pairs
are re-ordered for it (:func:`caption_order`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from sparsefusion.data.batch import Batch
from sparsefusion.data.encoded import CaptionOrder
from sparsefusion.models.inputs import ModelInputs
from sparsefusion.models.transformer import ModelConfig, ModelOutput
from sparsefusion.objectives.diffusion import IMAGE_LOSSES

if TYPE_CHECKING:
    from sparsefusion.objectives.diffusion import DiffusionSchedule


@dataclass(kw_only=True)
class ObjectiveConfig:
    """Which objective trains the model, and its settings (config key ``objective``).

    Attributes:
        name: registry key: ``ar`` (next-token cross-entropy over the unified vocabulary) or
            ``transfusion`` (cross-entropy on text plus a diffusion loss on continuous image
            latents of a VAE, arXiv 2408.11039).
        z_loss: weight of the Chameleon z-loss ``(log Z)^2`` per predicted token (0 disables it).

    The keys below are read by ``transfusion`` only (``ar`` ignores them).

    Attributes:
        image_loss: the image diffusion process (``objectives/diffusion.py``): ``ddpm`` (noise
            prediction on the cosine schedule, as the paper) or ``flow`` (rectified flow /
            flow matching: velocity prediction, logit-normal times, Euler sampling).
        diffusion_weight: lambda in L = L_LM + lambda * L_image (5, the Transfusion default).
        num_train_timesteps: T: the DDPM's steps; under ``flow`` the model's timestep input is
            t * T for t in [0, 1].
        beta_schedule: diffusers beta schedule of ``ddpm``; ``squaredcos_cap_v2`` is the cosine
            schedule (Nichol & Dhariwal, arXiv 2102.09672) Transfusion uses.
        flow_logit_mean: m of ``flow``'s training times t = sigmoid(m + s z), z ~ N(0, 1)
            (SD3's logit-normal, arXiv 2403.03206).
        flow_logit_std: s of those times (> 0).
        noise_limit: images that precede their caption draw t uniformly from [0, noise_limit)
            (Transfusion's t <= 500 rule; set it to num_train_timesteps to turn it off); under
            ``flow`` their logit-normal t is scaled into [0, noise_limit / T].
        caption_first: probability that an image-caption pair is ordered caption -> image
            (0.8 as in the paper; the rest are image -> caption, i.e. captioning data).
        caption_dropout: probability that a caption-first pair loses its caption (the image
            alone then trains the unconditional branch of classifier-free guidance). The paper
            does not state it; 0.1 as its close relatives.
        val_timesteps: validation draws every image's t from this many evenly spaced timesteps
            in [0, T - 1] (``flow``: strictly inside (0, 1)) in turn, with noise from a fixed
            seed, so that the validation diffusion loss of different runs is comparable point
            by point.
        val_noise_seed: seed of the fixed validation noise.
    """

    name: str = "ar"
    z_loss: float = 1e-5
    image_loss: str = "ddpm"
    diffusion_weight: float = 5.0
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0
    noise_limit: int = 500
    caption_first: float = 0.8
    caption_dropout: float = 0.1
    val_timesteps: int = 8
    val_noise_seed: int = 1234

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(
                f"objective.name must be one of {sorted(OBJECTIVES)}, got {self.name!r}"
            )
        if not (math.isfinite(self.z_loss) and self.z_loss >= 0):
            raise ValueError(f"objective.z_loss must be a finite number >= 0, got {self.z_loss}")
        if not (math.isfinite(self.diffusion_weight) and self.diffusion_weight >= 0):
            raise ValueError(
                f"objective.diffusion_weight must be finite and >= 0, got {self.diffusion_weight}"
            )
        if self.image_loss not in IMAGE_LOSSES:
            raise ValueError(
                f"objective.image_loss must be one of {sorted(IMAGE_LOSSES)}, "
                f"got {self.image_loss!r}"
            )
        if not math.isfinite(self.flow_logit_mean):
            raise ValueError(
                f"objective.flow_logit_mean must be finite, got {self.flow_logit_mean}"
            )
        if not (math.isfinite(self.flow_logit_std) and self.flow_logit_std > 0):
            raise ValueError(
                f"objective.flow_logit_std must be finite and > 0, got {self.flow_logit_std}"
            )
        if self.num_train_timesteps < 2:
            raise ValueError(
                f"objective.num_train_timesteps must be >= 2, got {self.num_train_timesteps}"
            )
        if not 1 <= self.noise_limit <= self.num_train_timesteps:
            raise ValueError(
                f"objective.noise_limit must be in [1, num_train_timesteps], got {self.noise_limit}"
            )
        for key in ("caption_first", "caption_dropout"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"objective.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.val_timesteps < 1:
            raise ValueError(f"objective.val_timesteps must be >= 1, got {self.val_timesteps}")


@dataclass
class LossTerm:
    """One differentiable part of the loss.

    Attributes:
        total: the SUM of the term over this batch (differentiable).
        count: name of the count in ``ObjectiveOutput.counts`` that normalises it.
        weight: multiplier of ``total / count`` in the loss.
    """

    total: torch.Tensor
    count: str
    weight: float = 1.0


@dataclass
class ObjectiveOutput:
    """An objective's result for one batch.

    Attributes:
        terms: named loss terms; loss = sum_t weight_t * total_t / counts[count_t].
        counts: host counts of this batch (e.g. valid next-token targets), known before forward
            (filled by ``train/step.py: forward_loss`` from the host batch, never from a device).
        logged: name -> (detached sum, count) to log as sum / count, e.g. ``loss``,
            ``loss/text``, ``z_loss``; sums of several batches add up.
    """

    terms: dict[str, LossTerm]
    counts: dict[str, int]
    logged: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def loss(self, normalizers: Mapping[str, float] | None = None) -> torch.Tensor:
        """The scalar to backpropagate: every term's sum over its normaliser.

        Args:
            normalizers: count name -> the count of the whole global batch (default: this batch's
                own counts, i.e. the mean over this batch).
        """
        norms = normalizers if normalizers is not None else self.counts
        parts = [t.weight * t.total / max(1.0, float(norms[t.count])) for t in self.terms.values()]
        return torch.stack(parts).sum()


class Objective(Protocol):
    """What the trainer, validation, train-aux, eval and the benchmark need from an objective.

    Attributes:
        noise_schedule: the diffusion process of continuous image spans (DDPM or flow), which
            generation samples them on (None: images are discrete codes, sampled token by token).
    """

    noise_schedule: DiffusionSchedule | None

    def counts(self, batch: Batch) -> dict[str, int]:
        """Host counts that normalise the loss terms (called on the host batch)."""
        ...

    def prepare(self, batch: Batch, *, generator: torch.Generator | None = None) -> ModelInputs:
        """The model's inputs for ``batch`` (host tensors; the caller moves them)."""
        ...

    def loss(self, output: ModelOutput, batch: Batch, inputs: ModelInputs) -> ObjectiveOutput:
        """Loss terms and logged values of one forward."""
        ...


ObjectiveBuilder = Callable[[ObjectiveConfig, ModelConfig], Objective]
CaptionOrderBuilder = Callable[[ObjectiveConfig, int], CaptionOrder]


@dataclass(frozen=True)
class ObjectiveEntry:
    """A registered objective.

    Attributes:
        build: ``(objective_cfg, model_cfg) -> Objective``.
        image_kind: the image tokenizer it trains on: ``vq`` (discrete codes) or ``vae``
            (continuous latents).
        caption_order: ``(objective_cfg, seed) -> CaptionOrder`` when it re-orders
            image-caption pairs (``data/encoded.py``), else None.
    """

    build: ObjectiveBuilder
    image_kind: str = "vq"
    caption_order: CaptionOrderBuilder | None = None


OBJECTIVES: dict[str, ObjectiveEntry] = {}


def register_objective(
    name: str, *, image_kind: str = "vq", caption_order: CaptionOrderBuilder | None = None
) -> Callable[[ObjectiveBuilder], ObjectiveBuilder]:
    """Register a builder ``(objective_cfg, model_cfg) -> Objective`` under ``name``, with what
    it needs from the data (see :class:`ObjectiveEntry`)."""

    def deco(builder: ObjectiveBuilder) -> ObjectiveBuilder:
        OBJECTIVES[name] = ObjectiveEntry(builder, image_kind, caption_order)
        return builder

    return deco


def build_objective(cfg: ObjectiveConfig, model: ModelConfig) -> Objective:
    """The objective named by ``cfg.name`` for a model of config ``model``."""
    return OBJECTIVES[cfg.name].build(cfg, model)


def image_kind(name: str) -> str:
    """The image tokenizer (``vq`` or ``vae``) objective ``name`` trains on."""
    return OBJECTIVES[name].image_kind


def caption_order(cfg: ObjectiveConfig, seed: int) -> CaptionOrder | None:
    """How the objective wants image-caption pairs ordered (None: as the source has them)."""
    entry = OBJECTIVES[cfg.name]
    return None if entry.caption_order is None else entry.caption_order(cfg, seed)


def per_modality_logged(
    prefix: str,
    values_N: torch.Tensor,
    modality_N: torch.Tensor,
    valid_N: torch.Tensor,
    names: list[str],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{prefix: (sum, count), prefix/<modality>: (sum, count)}`` of detached per-position values.

    Modalities with no valid position are still present (count 0), so sums of batches line up.
    """
    M = len(names)
    bucket_N = torch.where(valid_N, modality_N.reshape(-1), M)
    sums = torch.zeros(M + 1, dtype=torch.float64, device=values_N.device)
    sums.scatter_add_(0, bucket_N, values_N.detach().double() * valid_N)
    counts = torch.bincount(bucket_N, minlength=M + 1)[: M + 1]
    out = {prefix: (sums[:M].sum(), counts[:M].sum())}
    for m, name in enumerate(names):
        out[f"{prefix}/{name}"] = (sums[m], counts[m])
    return out
