"""Single-process checkpoints: safetensors weights and optimizer state, JSON train state.

Layout of one checkpoint (``<run_dir>/checkpoints/step_00000100/``)::

    model.safetensors      model weights
    optim.safetensors      optimizer tensors (moments, step counts) and RNG states
    state.json             step, tokens, FLOPs, data-loader state, optimizer param groups,
                           the SHA-256 of the two tensor files and of its own other contents

A checkpoint is written into a temporary folder and renamed into place, so a crash during a save
leaves the previous checkpoint intact; nothing is ever unpickled on load.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sparsefusion.runtime import faults

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")  # a checkpoint folder (complete or not)
DIGESTED = ("model.safetensors", "optim.safetensors")  # files whose SHA-256 state.json records
SELF_DIGEST = "state_digest"  # state.json's key for the SHA-256 of its other contents


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


class DiskWriteError(CheckpointError):
    """A run-folder file (config, metrics, export, aux routers) could not be written."""


def write_error_message(file: Path, error: BaseException) -> str:
    """One line for a failed write of ``file``, saying so when the disk is full."""
    if _no_space(error):
        return f"disk full: no space left on device while writing {file} (free space): {error}"
    return f"could not write {file}: {error}"


def write_atomic(file: Path, write: Callable[[Path], None]) -> None:
    """Write ``file`` through ``write(tmp)`` into a sibling temporary file, then rename it into
    place: the old file stays whole until the new one is complete.

    Raises:
        DiskWriteError: the write failed (full disk, permissions); the temporary file is gone.
    """
    file = Path(file)
    tmp = file.with_name(f".{file.name}.tmp_{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise DiskWriteError(write_error_message(file, e)) from e


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def file_digest(file: Path) -> str:
    """SHA-256 of a file (hex): ``state.json`` records those of the tensor files, so a byte
    changed after the save (a flipped bit, a partial copy) is found before the file is used."""
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def state_digest(payload: dict[str, Any]) -> str:
    """SHA-256 of ``payload`` (less its own digest) in canonical JSON: any later change to
    ``state.json`` that still parses (a flipped digit in the loader's token buffer) shows."""
    rest = {k: v for k, v in payload.items() if k != SELF_DIGEST}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def state_json(payload: dict[str, Any]) -> str:
    """The text of ``state.json`` for ``payload``, its own digest added."""
    return json.dumps({**payload, SELF_DIGEST: state_digest(payload)})


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name[5:])) if done else None


def append_row(file: Path, row: dict[str, Any]) -> None:
    """Append one JSON row to ``file``; on a failed write the file is cut back to its old end
    (never left ending in a half-written row).

    Raises:
        DiskWriteError: the row could not be written (the message names the file).
    """
    data = (json.dumps(row) + "\n").encode()
    try:
        fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise DiskWriteError(write_error_message(file, e)) from e
    end = -1
    try:
        end = os.fstat(fd).st_size
        while data:
            data = data[os.write(fd, data) :]
    except OSError as e:
        if end >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
        raise DiskWriteError(write_error_message(file, e)) from e
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Atomically write a checkpoint for ``step`` and prune all but the newest ``keep``."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(_contiguous(model.state_dict()), str(tmp / "model.safetensors"))
        faults.maybe_pause("pause_in_save", step, run_dir)
        tensors, groups = _flatten_optimizer(optimizer)
        tensors.update(rng_tensors())
        save_file(tensors, str(tmp / "optim.safetensors"))
        digests = {name: file_digest(tmp / name) for name in DIGESTED}
        payload = dict(state, step=step, param_groups=groups, digests=digests)
        (tmp / "state.json").write_text(state_json(payload))
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_entries(root)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(disk_error_message(final, e)) from e
    prune_checkpoints(root, keep)
    return final


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Restore model (and optimizer, RNG) from ``path``; returns the train state mapping."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "model.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (was it trained with another model config?)"
        )
    try:
        extra = load_file(str(path / "optim.safetensors"))
        if optimizer is not None:
            optimizer.load_state_dict(unflatten_optimizer(extra, state["param_groups"]))
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"cannot restore the optimizer from {path}: {e}") from e
    restore_rng(extra)
    return state


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in sd.items()}


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {}
    for idx, pstate in sd["state"].items():
        for name, value in pstate.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{idx}.{name}"] = t.detach().contiguous()
    return tensors, sd["param_groups"]


def unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": groups}


def rng_tensors() -> dict[str, torch.Tensor]:
    """The CPU (and CUDA) random-number-generator states, as tensors."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Restore the states saved by :func:`rng_tensors`."""
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def disk_error_message(final: Path, error: BaseException) -> str:
    """A clear message for a failed checkpoint write, naming the path (and a full disk)."""
    if _no_space(error):
        return (
            f"disk full: no space left on device while writing checkpoint {final}; the previous "
            f"checkpoint is intact (free space or lower run.keep_checkpoints): {error}"
        )
    return f"could not write checkpoint {final}: {error}"


def _no_space(error: BaseException) -> bool:
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
        "No space left" in str(error)
    )


def fsync_tree(path: Path) -> None:
    """Flush a folder's files (recursively) and entry lists to disk (best effort)."""
    for child in path.iterdir() if path.is_dir() else []:
        if child.is_dir():
            fsync_tree(child)
        elif child.is_file():
            with open(child, "rb+") as f:
                os.fsync(f.fileno())
    _fsync_entries(path)


def _fsync_entries(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints and stale temporary folders."""
    done = sorted(
        (p for p in root.iterdir() if STEP_DIR.match(p.name)), key=lambda p: int(p.name[5:])
    )
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp_step_*"):
        if not stale.name.endswith(f"_{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
