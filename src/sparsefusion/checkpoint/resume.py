"""Choosing the checkpoint to resume from: validate before trusting, never restart silently.

A checkpoint folder is checked against the model (and optimizer) it is loaded into by
``checkpoint/validate.py``: every key and type of ``state.json``, every tensor name, shape and
dtype, finite values, the data-loader and RNG states. :func:`check_checkpoint` is the one check;
resuming and every reader (``checkpoint/weights.py``'s ``pick_checkpoint``) go through it.

- A *damaged* checkpoint (missing, truncated or unreadable file, malformed ``state.json``,
  non-finite weights, a tensor of the wrong dtype, optimizer state of the wrong shape) is
  skipped with a warning naming what is wrong; the newest valid one older than it is used. The
  trainer moves damaged folders to ``checkpoints/damaged_step_*`` (never deleted, never pruned,
  never loaded again).
- A readable checkpoint whose weights have other names or shapes (another architecture) is an
  error.
- When checkpoint folders exist but none is usable, resuming is refused: starting again from
  step 0 would discard the run's metrics and, later, its checkpoints.

Shape legend: none.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from sparsefusion.checkpoint.store import STEP_DIR, CheckpointError, checkpoint_dir
from sparsefusion.checkpoint.validate import (
    CheckpointSpec,
    Damaged,
    Mismatch,
    check_rng_file,
    check_shard_state,
    check_single,
    checkpoint_spec,
    compare_shapes,
    read_json,
    read_state,
)

log = logging.getLogger("sparsefusion")

DAMAGED_PREFIX = "damaged_"


@dataclass(frozen=True)
class Problem:
    """What is wrong with one checkpoint: ``kind`` is ``damaged`` or ``mismatch``."""

    kind: str
    detail: str


def step_folders(run_dir: Path) -> list[Path]:
    """Every ``checkpoints/step_*`` folder of a run, newest first (complete or not)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def check_checkpoint(path: Path, spec: CheckpointSpec | nn.Module) -> Problem | None:
    """None when checkpoint ``path`` is valid for ``spec`` (or a model); else the problem."""
    path = Path(path)
    if isinstance(spec, nn.Module):
        spec = checkpoint_spec(spec)
    try:
        if _is_dcp(path):
            _check_dcp(path, spec)
        else:
            check_single(path, spec)
    except Damaged as e:
        return Problem("damaged", str(e))
    except Mismatch as e:
        return Problem("mismatch", str(e))
    return None


def select_checkpoint(
    run_dir: Path, model: nn.Module | CheckpointSpec
) -> tuple[Path | None, list[Path]]:
    """The newest usable checkpoint of a run for ``model`` (or a spec with its optimizer) and
    the damaged ones newer than it.

    Raises:
        CheckpointError: a checkpoint of another architecture, or folders exist but none is
            usable (the message lists what is wrong with each).
    """
    spec = checkpoint_spec(model) if isinstance(model, nn.Module) else model
    damaged: list[tuple[Path, str]] = []
    for folder in step_folders(run_dir):
        problem = check_checkpoint(folder, spec)
        if problem is None:
            for bad, why in damaged:
                msg = f"checkpoint {bad} is damaged ({why}); resuming from {folder.name} instead"
                log.warning(msg)
            return folder, [p for p, _ in damaged]
        if problem.kind == "mismatch":
            raise CheckpointError(
                f"checkpoint {folder} does not match the model ({problem.detail}); it was trained "
                "with another model config: use another run.dir, or the config of that run"
            )
        damaged.append((folder, problem.detail))
    if damaged:
        listing = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise CheckpointError(
            f"{checkpoint_dir(run_dir)} holds {len(damaged)} checkpoint folder(s) and none can be "
            f"resumed from ({listing}). Nothing was changed: repair them, or start over in another "
            "run.dir"
        )
    return None, []


def resume_checkpoint(
    run_dir: Path, model: nn.Module | CheckpointSpec, env: Any = None
) -> Path | None:
    """:func:`select_checkpoint`, then move the damaged folders aside (rank 0, after a barrier).

    Call on every rank: the choice is the same everywhere (a shared file system).
    """
    from sparsefusion.distributed.mesh import barrier

    chosen, damaged = select_checkpoint(run_dir, model)
    barrier()  # every rank has chosen before any folder moves
    if damaged and (env is None or env.is_main):
        for folder in damaged:
            target = quarantine(folder)
            log.warning("moved the damaged checkpoint %s to %s", folder, target)
    barrier()
    return chosen


def quarantine(folder: Path) -> Path:
    """Rename ``step_N`` to ``damaged_step_N`` (with a suffix if taken); returns the new path."""
    target = folder.with_name(DAMAGED_PREFIX + folder.name)
    n = 1
    while target.exists():
        target = folder.with_name(f"{DAMAGED_PREFIX}{folder.name}.{n}")
        n += 1
    os.replace(folder, target)
    return target


def _is_dcp(path: Path) -> bool:
    return (path / "dcp").is_dir()


def _check_dcp(path: Path, spec: CheckpointSpec) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from sparsefusion.checkpoint.dcp import safe_load_metadata

    state = read_state(path, dcp=True)
    for i, group in enumerate(state["param_groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise Damaged(f"state.json param_groups[{i}] is malformed (no 'params' list)")
    meta_file = path / "dcp" / ".metadata"
    if not meta_file.is_file():
        raise Damaged("dcp/.metadata is missing")
    try:
        metadata = safe_load_metadata(meta_file.read_bytes())
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise Damaged(f"dcp/.metadata is unreadable ({type(e).__name__}: {e})") from e
    for info in (metadata.storage_data or {}).values():
        file = path / "dcp" / info.relative_path
        if not file.is_file() or file.stat().st_size < info.offset + info.length:
            raise Damaged(f"dcp/{info.relative_path} is missing or truncated")
    num = state["num_data_shards"]
    for s in range(num):
        shard = read_json(path / "data" / f"shard_{s:05d}.json")
        check_shard_state(shard, f"data/shard_{s:05d}.json", rank=s, world_size=num)
    for file in sorted((path / "rng").glob("rank_*.safetensors")):
        check_rng_file(file)
    model = {
        k[len("model.") :]: v
        for k, v in metadata.state_dict_metadata.items()
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }
    compare_shapes({k: tuple(v.size) for k, v in model.items()}, spec)
    for key, (_, dtype) in spec.tensors.items():
        if model[key].properties.dtype != dtype:
            raise Damaged(f"dcp {key} is {model[key].properties.dtype}, the model {dtype}")
