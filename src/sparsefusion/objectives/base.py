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

Objectives are looked up by ``objective.name`` in :data:`OBJECTIVES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from sparsefusion.data.batch import Batch
from sparsefusion.models.inputs import ModelInputs
from sparsefusion.models.transformer import ModelConfig, ModelOutput


@dataclass(kw_only=True)
class ObjectiveConfig:
    """Which objective trains the model, and its settings (config key ``objective``).

    Attributes:
        name: registry key: ``ar`` (next-token cross-entropy over the unified vocabulary).
        z_loss: weight of the Chameleon z-loss ``(log Z)^2`` per predicted token (0 disables it).
    """

    name: str = "ar"
    z_loss: float = 1e-5

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(
                f"objective.name must be one of {sorted(OBJECTIVES)}, got {self.name!r}"
            )
        if not (math.isfinite(self.z_loss) and self.z_loss >= 0):
            raise ValueError(f"objective.z_loss must be a finite number >= 0, got {self.z_loss}")


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
    """What the trainer, validation, train-aux, eval and the benchmark need from an objective."""

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
OBJECTIVES: dict[str, ObjectiveBuilder] = {}


def register_objective(name: str) -> Callable[[ObjectiveBuilder], ObjectiveBuilder]:
    """Register a builder ``(objective_cfg, model_cfg) -> Objective`` under ``name``."""

    def deco(builder: ObjectiveBuilder) -> ObjectiveBuilder:
        OBJECTIVES[name] = builder
        return builder

    return deco


def build_objective(cfg: ObjectiveConfig, model: ModelConfig) -> Objective:
    """The objective named by ``cfg.name`` for a model of config ``model``."""
    return OBJECTIVES[cfg.name](cfg, model)


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
