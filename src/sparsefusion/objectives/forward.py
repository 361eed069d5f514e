"""The one forward-and-loss function: trainer, validation, train-aux, eval and bench call it.

``forward_loss`` takes a host batch, lets the objective build the model inputs (the routing plan
is built there, once), moves them to the device, runs the model and the objective, and returns
everything as fresh values. The router losses of the model are added to the loss as a mean over
micro-batches; the objective's terms are sums normalised by counts of the global batch, so the
caller decides what one step's loss is (see :meth:`StepOutput.loss`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from sparsefusion.data.batch import Batch
from sparsefusion.models.inputs import ForwardContext, ModelInputs
from sparsefusion.models.transformer import ModelOutput
from sparsefusion.objectives.base import Objective, ObjectiveOutput


@dataclass
class StepOutput:
    """One batch's forward and objective.

    Attributes:
        objective: loss terms, host counts and logged sums.
        model: the model's outputs (router losses, metrics, records).
        inputs: the host inputs the model ran on (their plan's counts feed the FLOPs count).
    """

    objective: ObjectiveOutput
    model: ModelOutput
    inputs: ModelInputs

    def loss(
        self, normalizers: Mapping[str, float] | None = None, micro_batches: int = 1
    ) -> torch.Tensor:
        """Objective terms over the global counts, plus router losses / ``micro_batches``."""
        loss = self.objective.loss(normalizers)
        if self.model.aux_losses:
            loss = loss + sum(self.model.aux_losses.values()) / micro_batches
        return loss


def forward_loss(
    model: nn.Module,
    batch: Batch,
    objective: Objective,
    *,
    device: torch.device | str = "cpu",
    amp: contextlib.AbstractContextManager | None = None,
    ctx: ForwardContext | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Forward and objective of one host batch.

    Args:
        model: the model (possibly wrapped by DDP/FSDP/compile/checkpointing).
        batch: a host batch (as the loaders produce it).
        objective: the run's objective.
        device: where the model lives.
        amp: autocast context (default none).
        ctx: routing mode, aux routers, trace.
        generator: random source of objectives that sample (noise, timesteps).
    """
    counts = objective.counts(batch)
    inputs = objective.prepare(batch, generator=generator)
    with amp if amp is not None else contextlib.nullcontext():
        out = model(inputs.to(device), ctx)
    result = objective.loss(out, batch.to(device), inputs)
    result.counts = counts
    return StepOutput(result, out, inputs)


class LoggedSums:
    """Adds up objectives' logged (sum, count) pairs on the device (no syncs until ``means``)."""

    def __init__(self) -> None:
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, out: ObjectiveOutput) -> None:
        for name, (s, c) in out.logged.items():
            if name in self.sums:
                s0, c0 = self.sums[name]
                s, c = s0 + s, c0 + c
            self.sums[name] = (s, c)

    def totals(self) -> tuple[list[str], torch.Tensor]:
        """Names and a (2, K) float64 tensor of their sums and counts (one device tensor)."""
        names = list(self.sums)
        if not names:
            return names, torch.zeros(2, 0, dtype=torch.float64)
        stacked = [torch.stack([s.double(), c.double()]) for s, c in self.sums.values()]
        return names, torch.stack(stacked, dim=1)


def means(names: list[str], totals_2K: torch.Tensor) -> dict[str, float]:
    """``sum / count`` of every name with a count > 0 (host floats)."""
    host = totals_2K.cpu().tolist()
    return {n: s / c for n, s, c in zip(names, host[0], host[1], strict=True) if c > 0}
