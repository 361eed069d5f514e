"""Choosing the checkpoint to resume from: validate before trusting, never restart silently.

A checkpoint folder is checked without loading its tensors: every file present and readable
(safetensors headers cover their files; DCP ``.metadata`` names shard files that exist and are
long enough), ``state.json`` well formed, and every weight's name and shape equal to the model's.

- A *damaged* checkpoint (missing, truncated or unreadable file, malformed ``state.json``) is
  skipped with a warning naming what is wrong; the newest valid one older than it is used. The
  trainer moves damaged folders to ``checkpoints/damaged_step_*`` (never deleted, never pruned,
  never loaded again).
- A readable checkpoint whose weights do not match the model (another architecture) is an error.
- When checkpoint folders exist but none is usable, resuming is refused: starting again from
  step 0 would discard the run's metrics and, later, its checkpoints.

Shape legend: none.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import nn

from sparsefusion.checkpoint.store import STEP_DIR, CheckpointError, checkpoint_dir

log = logging.getLogger("sparsefusion")

DAMAGED_PREFIX = "damaged_"
_SHARD_KEYS = ("version", "rank", "world_size", "docs_read", "buffer", "tokens_emitted")


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


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every entry of the (unwrapped) model's state dict."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> Problem | None:
    """None when checkpoint ``path`` looks complete and matches ``shapes``; else the problem."""
    path = Path(path)
    try:
        state = _read_state(path)
        is_dcp = state.get("format") == "dcp" or (path / "dcp" / ".metadata").is_file()
        saved = _dcp_shapes(path, state) if is_dcp else _single_shapes(path, state)
    except _Damaged as e:
        return Problem("damaged", str(e))
    differ = _compare(saved, shapes)
    return Problem("mismatch", differ) if differ else None


def select_checkpoint(run_dir: Path, model: nn.Module) -> tuple[Path | None, list[Path]]:
    """The newest usable checkpoint of a run and the damaged ones newer than it.

    Raises:
        CheckpointError: a checkpoint of another architecture, or folders exist but none is
            usable (the message lists what is wrong with each).
    """
    shapes = model_shapes(model)
    damaged: list[tuple[Path, str]] = []
    for folder in step_folders(run_dir):
        problem = check_checkpoint(folder, shapes)
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
            f"resumed from ({listing}). Nothing was changed: repair or move them away to start "
            "again from step 0, or use another run.dir"
        )
    return None, []


def resume_checkpoint(run_dir: Path, model: nn.Module, env: Any = None) -> Path | None:
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


class _Damaged(Exception):
    pass


def _read_state(path: Path) -> dict[str, Any]:
    file = path / "state.json"
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise _Damaged("state.json is missing (the save did not complete)") from None
    except (OSError, ValueError) as e:
        raise _Damaged(f"state.json is unreadable ({e})") from e
    if not isinstance(state, dict):
        raise _Damaged("state.json is not a JSON object")
    step = int(path.name[5:])
    if state.get("step") != step:
        raise _Damaged(f"state.json has step {state.get('step')!r}, the folder is step {step}")
    for key, types in (("tokens", int), ("flops", int | float), ("param_groups", list)):
        if not isinstance(state.get(key), types) or isinstance(state.get(key), bool):
            raise _Damaged(f"state.json has no valid {key!r}")
    if not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in state["param_groups"]
    ):
        raise _Damaged("state.json has malformed param_groups")
    return state


def _header(file: Path) -> dict[str, tuple[int, ...]]:
    if not file.is_file():
        raise _Damaged(f"{file.name} is missing")
    try:
        with safe_open(str(file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise _Damaged(f"{file.name} is unreadable or truncated ({e})") from e


def _single_shapes(path: Path, state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    _check_loader_state(state.get("loader"))
    weights = _header(path / "model.safetensors")
    extra = _header(path / "optim.safetensors")
    num_params = sum(len(g["params"]) for g in state["param_groups"])
    bad = [k for k in extra if k.startswith("optim.") and int(k.split(".")[1]) >= num_params]
    if bad:
        raise _Damaged(f"optim.safetensors holds state for unknown parameters {bad[:3]}")
    return weights


def _check_loader_state(loader: Any) -> None:
    if isinstance(loader, dict) and "version" in loader:
        loader = {"num_shards": 1, "shards": {"0": loader}}
    if not isinstance(loader, dict) or not isinstance(loader.get("shards"), dict):
        raise _Damaged("state.json has no valid data-loader state")
    for shard in loader["shards"].values():
        if not isinstance(shard, dict) or any(k not in shard for k in _SHARD_KEYS):
            raise _Damaged("state.json has a malformed data-loader state")


def _dcp_shapes(path: Path, state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from sparsefusion.checkpoint.dcp import safe_load_metadata

    meta_file = path / "dcp" / ".metadata"
    try:
        metadata = safe_load_metadata(meta_file.read_bytes())
    except FileNotFoundError:
        raise _Damaged("dcp/.metadata is missing") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise _Damaged(f"dcp/.metadata is unreadable ({type(e).__name__}: {e})") from e
    for info in (metadata.storage_data or {}).values():
        file = path / "dcp" / info.relative_path
        if not file.is_file() or file.stat().st_size < info.offset + info.length:
            raise _Damaged(f"dcp/{info.relative_path} is missing or truncated")
    num = state.get("num_data_shards")
    if not isinstance(num, int) or num < 1:
        raise _Damaged("state.json has no valid num_data_shards")
    for s in range(num):
        file = path / "data" / f"shard_{s:05d}.json"
        try:
            _check_loader_state({"shards": {"0": json.loads(file.read_text())}})
        except (OSError, ValueError) as e:
            raise _Damaged(f"data/{file.name} is missing or unreadable ({e})") from e
    return {
        k[len("model.") :]: tuple(v.size)
        for k, v in metadata.state_dict_metadata.items()
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }


def _compare(saved: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> str:
    missing = sorted(set(shapes) - set(saved))
    unexpected = sorted(set(saved) - set(shapes))
    resized = [
        f"{k} {saved[k]} vs {shapes[k]}" for k in sorted(set(saved) & set(shapes))
        if saved[k] != shapes[k]
    ]  # fmt: skip
    parts = []
    if missing:
        parts.append(f"missing {missing[:3]}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:3]}")
    if resized:
        parts.append(f"shapes differ: {resized[:3]} (checkpoint vs model)")
    return ", ".join(parts)
