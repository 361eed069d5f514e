"""Validation: the objective's logged values over a fixed list of held-out batches."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sparsefusion.data.batch import Batch
from sparsefusion.models.inputs import ForwardContext
from sparsefusion.objectives.base import Objective
from sparsefusion.objectives.forward import LoggedSums, forward_loss, means


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Sequence[Batch],
    objective: Objective,
    *,
    device: torch.device | str = "cpu",
    amp: contextlib.AbstractContextManager | None = None,
    ctx: ForwardContext | None = None,
) -> dict[str, Any]:
    """Token-weighted means of the objective's logged values (e.g. ``loss``, ``loss/<modality>``).

    Args:
        model: the model (put in eval mode for the pass, restored afterwards).
        batches: the held-out host batches.
        objective: the run's objective.
        device: where the model lives.
        amp: autocast context.
        ctx: routing mode and aux routers (e.g. causal routing).

    Returns:
        ``{"loss": ..., "loss/<modality>": ..., "val_tokens": ...}`` (modalities absent from the
        batches are left out); empty without batches.
    """
    was_training = model.training
    model.eval()
    sums = LoggedSums()
    for batch in batches:
        sums.add(forward_loss(model, batch, objective, device=device, amp=amp, ctx=ctx).objective)
    model.train(was_training)
    names, totals = sums.totals()
    if not names:
        return {}
    row: dict[str, Any] = dict(means(names, totals))
    if "loss" in names:
        row["val_tokens"] = int(totals[1, names.index("loss")])
    return row


def evaluate_sources(
    model: nn.Module, by_source: dict[str, Sequence[Batch]], objective: Objective, **kwargs: Any
) -> dict[str, float]:
    """:func:`evaluate` on each source's batches, its losses renamed ``loss/source/<name>`` (and
    ``loss/source/<name>/<modality>``) to sit beside the whole mix's in one validation row."""
    row: dict[str, float] = {}
    for name, batches in by_source.items():
        for key, value in evaluate(model, batches, objective, **kwargs).items():
            if key == "loss" or key.startswith("loss/"):
                row[f"loss/source/{name}{key.removeprefix('loss')}"] = value
    return row
