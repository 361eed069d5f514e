"""Load a finished run's weights for inference (generate, eval, export, serve).

One way for every reader: the checkpoint is chosen as resuming chooses it (the newest that passes
``checkpoint/resume.py``'s validation; damaged newer ones are skipped with a warning) or named by
step (then validated, and a problem is an error), and either format loads (single-process
safetensors or sharded DCP, into a plain process).
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from sparsefusion.checkpoint.resume import check_checkpoint, select_checkpoint, step_folders
from sparsefusion.checkpoint.store import CheckpointError, checkpoint_dir


def pick_checkpoint(run_dir: Path, model: nn.Module, step: int | None = None) -> Path:
    """The newest valid checkpoint of ``run_dir`` (``step`` None) or ``checkpoints/step_<step>``.

    Raises:
        CheckpointError: no usable checkpoint, or the named one is missing or damaged.
    """
    run_dir = Path(run_dir)
    if step is None:
        ckpt, _ = select_checkpoint(run_dir, model)  # warns about damaged newer ones
        if ckpt is None:
            raise CheckpointError(f"{run_dir} holds no complete checkpoint")
        return ckpt
    ckpt = checkpoint_dir(run_dir) / f"step_{step:08d}"
    if not ckpt.is_dir():
        have = [p.name for p in reversed(step_folders(run_dir))]
        raise CheckpointError(f"checkpoint {step}: {ckpt} does not exist; the run has {have}")
    problem = check_checkpoint(ckpt, model)
    if problem is not None:
        raise CheckpointError(f"checkpoint {step}: {ckpt} is {problem.kind}: {problem.detail}")
    return ckpt


def load_weights(ckpt: Path, model: nn.Module) -> None:
    """Load the model weights of checkpoint folder ``ckpt`` (either format) into ``model``."""
    from sparsefusion.checkpoint.dcp import is_dcp_checkpoint, load_dcp_checkpoint
    from sparsefusion.distributed.mesh import DistEnv

    if is_dcp_checkpoint(ckpt):
        load_dcp_checkpoint(ckpt, model, None, DistEnv())
        return
    try:
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    except (OSError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"cannot load {ckpt / 'model.safetensors'}: {e}") from e
