"""A training checkpoint of either format: counters, model, optimizer and data position.

One process writes the single-process safetensors format (``checkpoint/store.py``); under
torchrun every rank writes its shard of a DCP checkpoint (``checkpoint/dcp.py``). Either loads
into either kind of run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

from sparsefusion.checkpoint import dcp
from sparsefusion.checkpoint.store import load_checkpoint, save_checkpoint
from sparsefusion.distributed.mesh import DistEnv


@dataclass
class TrainState:
    """Counters that survive a restart (the data-loader state travels beside them)."""

    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    skipped_steps: int = 0
    elapsed_s: float = 0.0  # wall-clock seconds spent in training steps, across resumes

    def counters(self) -> dict[str, Any]:
        """What a checkpoint stores beside the weights (``state.json``)."""
        return {
            "tokens": self.tokens,
            "flops": self.flops,
            "skipped_steps": self.skipped_steps,
            "elapsed_s": self.elapsed_s,
        }

    def position(self) -> dict[str, Any]:
        """Where the run stands, for metric rows."""
        return {"tokens": self.tokens, "flops": self.flops, "elapsed_s": self.elapsed_s}

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainState:
        return cls(
            step=saved["step"],
            tokens=saved["tokens"],
            flops=saved["flops"],
            skipped_steps=saved.get("skipped_steps", 0),
            elapsed_s=saved.get("elapsed_s", 0.0),
        )


def load_training(ckpt: Path, model: nn.Module, optimizer: Optimizer, env: DistEnv) -> dict:
    """Load a checkpoint of either format into the model and optimizer; returns its state
    (``step``, counters and ``loader``)."""
    if dcp.is_dcp_checkpoint(ckpt):
        return dcp.load_dcp_checkpoint(ckpt, model, optimizer, env)
    if env.is_distributed:
        return dcp.load_single_checkpoint(ckpt, model, optimizer)
    return load_checkpoint(ckpt, model, optimizer)


def save_training(
    run_dir: Path,
    state: TrainState,
    model: nn.Module,
    optimizer: Optimizer,
    loader_state: Any,
    env: DistEnv,
    *,
    keep: int,
) -> None:
    """Write the checkpoint of ``state.step`` (sharded DCP under torchrun)."""
    counters = state.counters()
    if env.is_distributed:
        dcp.save_dcp_checkpoint(
            run_dir, state.step, model, optimizer, counters, loader_state, env, keep=keep
        )
    else:
        counters["loader"] = loader_state
        save_checkpoint(run_dir, state.step, model, optimizer, counters, keep=keep)
