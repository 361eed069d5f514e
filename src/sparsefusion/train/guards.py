"""Gradient clipping and what a step does about a non-finite loss or gradient."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from sparsefusion.checkpoint.store import latest_checkpoint

log = logging.getLogger("sparsefusion")


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm (over all ranks' shards under FSDP), clipped to ``max_norm`` if > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(total, "full_tensor"):  # a DTensor (FSDP2): sum the shards' partial norms
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def on_nonfinite(skip: bool, step: int, grad_norm: float, run_dir: Path) -> None:
    """Stop with a clear message (or, with ``train.skip_nonfinite``, log and go on)."""
    if skip:
        log.warning("step %d: non-finite loss/gradient (norm %s): update skipped", step, grad_norm)
        return
    ckpt = latest_checkpoint(run_dir)
    raise FloatingPointError(
        f"non-finite loss or gradient at step {step} (gradient norm {grad_norm}); the run stopped "
        f"before updating the weights. The last good checkpoint is kept: "
        f"{ckpt if ckpt is not None else 'none yet'}. Set train.skip_nonfinite=true to skip such "
        "batches instead."
    )


def check_finite(row: dict[str, Any], step: int) -> None:
    if not torch.isfinite(torch.tensor(row["loss"])):
        raise FloatingPointError(
            f"non-finite loss {row['loss']} at step {step}; the last checkpoint is kept intact"
        )
