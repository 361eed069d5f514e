"""Validation loss per modality over a fixed list of held-out batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sparsefusion.data.batch import Batch
from sparsefusion.objectives.ar import LossOutput


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Sequence[Batch],
    loss_fn: Callable[[Batch], LossOutput],
    modalities: Sequence[str],
) -> dict[str, Any]:
    """Mean cross-entropy over all valid targets, overall and per modality (by target token).

    Args:
        model: the model (put in eval mode for the pass, restored afterwards).
        batches: the held-out batches.
        loss_fn: computes the loss output of one batch.
        modalities: modality names, in modality-index order.

    Returns:
        ``{"loss": ..., "loss/<modality>": ..., "val_tokens": ...}`` (modalities absent from the
        batches are left out).
    """
    was_training = model.training
    model.eval()
    ce_sum, count = None, None
    for batch in batches:
        out = loss_fn(batch)
        ce_sum = out.ce_sum_M if ce_sum is None else ce_sum + out.ce_sum_M
        count = out.count_M if count is None else count + out.count_M
    model.train(was_training)
    if ce_sum is None:
        return {}
    ce, n = ce_sum.cpu().tolist(), count.cpu().tolist()
    row: dict[str, Any] = {"loss": sum(ce) / max(1, sum(n)), "val_tokens": int(sum(n))}
    for name, s, c in zip(modalities, ce, n, strict=True):
        if c > 0:
            row[f"loss/{name}"] = s / c
    return row
