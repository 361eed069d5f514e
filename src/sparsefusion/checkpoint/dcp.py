"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), resharding on load.

Layout of one checkpoint (``<run_dir>/checkpoints/step_00000100/``)::

    dcp/.metadata, dcp/__<rank>_0.distcp   model weights and optimizer tensors, each rank its shards
    data/shard_<s>.json                    the state of data stream ``s`` (see data/shards.py)
    rng/rank_<r>.safetensors               RNG state of rank ``r``
    state.json                             step, tokens, FLOPs, optimizer param groups; written last

Keys are fully qualified parameter names (``get_state_dict``), so a checkpoint saved with FSDP2 or
DDP on N processes loads on M processes, or in a plain process (no process group). All ranks
write into one temporary folder (a shared file system) and rank 0 renames it into place after a
barrier, so a crash at any point leaves the previous checkpoint usable.

Safe loading: only tensors go into DCP (non-tensor values would be stored pickled); param groups
and counters are JSON. DCP's ``.metadata`` file is a pickle, so it is read with an unpickler that
accepts only DCP's metadata classes, ``torch.Size`` and dtypes; anything else is refused.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparsefusion.checkpoint.store import (
    CheckpointError,
    checkpoint_dir,
    disk_error_message,
    fsync_tree,
    prune_checkpoints,
    restore_rng,
    rng_tensors,
    state_json,
)
from sparsefusion.distributed.mesh import DistEnv, all_reduce_sum, barrier
from sparsefusion.runtime import faults

log = logging.getLogger("sparsefusion")

FORMAT = "dcp"


def is_dcp_checkpoint(path: Path) -> bool:
    """True when ``path`` is a checkpoint in the DCP layout."""
    return (Path(path) / "dcp" / ".metadata").is_file()


def save_dcp_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    data_state: dict[str, Any],
    env: DistEnv,
    *,
    keep: int = 2,
) -> Path:
    """Collectively write a sharded checkpoint for ``step`` (call on every rank).

    Args:
        run_dir: the run folder.
        step: the optimizer step.
        model: the (FSDP2/DDP-wrapped) model.
        optimizer: its optimizer.
        state: JSON counters (identical on every rank); rank 0 writes them.
        data_state: this rank's ``ShardedLoaders.state_dict()``.
        env: this rank's distributed environment.
        keep: how many of the newest checkpoints to keep.

    Returns:
        The final checkpoint folder.

    Raises:
        CheckpointError: on every rank when any rank failed to write (disk full, ...).
    """
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_dcp"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in ("dcp", "data", "rng"):
            (tmp / sub).mkdir(parents=True)
    barrier()
    msd, osd = get_state_dict(model, optimizer)
    error = ""
    try:
        writer = FileSystemWriter(tmp / "dcp")
        dcp_save({"model": msd, "optim": osd["state"]}, storage_writer=writer)
        for s, shard in data_state["shards"].items():
            (tmp / "data" / f"shard_{int(s):05d}.json").write_text(json.dumps(shard))
        save_file(rng_tensors(), str(tmp / "rng" / f"rank_{env.rank:05d}.safetensors"))
        faults.maybe_pause("pause_in_save", step, run_dir)
    except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
        error = disk_error_message(final, e)
    failed = _failed_anywhere(error)
    if env.is_main and not failed:
        try:
            payload = dict(
                state,
                step=step,
                format=FORMAT,
                world_size=env.world_size,
                num_data_shards=data_state["num_shards"],
                param_groups=osd["param_groups"],
            )
            (tmp / "state.json").write_text(state_json(payload))
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            error = disk_error_message(final, e)
    if _failed_anywhere(error) or failed:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        raise CheckpointError(error or f"could not write checkpoint {final}: another rank failed")
    if env.is_main:
        prune_checkpoints(root, keep)
    barrier()
    return final


def _failed_anywhere(error: str) -> bool:
    flag = torch.tensor([1.0 if error else 0.0])
    return bool(all_reduce_sum(flag).item() > 0)


def load_dcp_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, env: DistEnv
) -> dict[str, Any]:
    """Load a DCP checkpoint into ``model`` (and ``optimizer``), resharding as needed.

    Works on any number of ranks and in a plain process. Returns the state mapping with the
    merged data-stream states under ``"loader"``.
    """
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    reader = SafeFileSystemReader(path / "dcp")
    if optimizer is None:
        msd = get_model_state_dict(model)
        _load(dcp_load, {"model": msd}, reader, path)
        _check_finite({"model": msd}, path)
        set_model_state_dict(model, msd)
    else:
        msd, osd = get_state_dict(model, optimizer)
        sd = {"model": msd, "optim": osd["state"]}
        _load(dcp_load, sd, reader, path)
        _check_finite(sd, path)
        groups = state["param_groups"]
        set_state_dict(
            model,
            optimizer,
            model_state_dict=msd,
            optim_state_dict={"state": sd["optim"], "param_groups": groups},
        )
    rng = path / "rng" / f"rank_{env.rank:05d}.safetensors"
    if rng.is_file():
        restore_rng(load_file(str(rng)))
    state["loader"] = read_data_states(path, int(state["num_data_shards"]))
    return state


def _load(dcp_load, sd: dict, reader, path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load(sd, storage_reader=reader, no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
        if "checkpoint metadata" in str(e):
            raise CheckpointError(f"unsafe or corrupt checkpoint {path}: {e}") from e
        raise CheckpointError(
            f"checkpoint {path} does not match the model ({type(e).__name__}: {e}); "
            "was it trained with another model config?"
        ) from e


def _check_finite(sd: dict, path: Path) -> None:
    """Every loaded floating-point tensor (this rank's shard) finite, on every rank; the check
    that validation before the load cannot make without reading the shards."""
    bad = next((key for key, t in _tensors(sd) if not _finite(t)), "")
    if _failed_anywhere(bad):
        where = f"{bad} holds" if bad else "another rank's shard holds"
        raise CheckpointError(
            f"checkpoint {path} is damaged: {where} non-finite values (NaN or inf); move it "
            f"aside (mv {path} {path.with_name('damaged_' + path.name)}) to resume from the "
            "newest older checkpoint"
        )


def _tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted key, tensor) of a nested state dict; DTensors as their local shard."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f"{prefix}{key}.")
    elif isinstance(tree, torch.Tensor):
        yield prefix[:-1], getattr(tree, "to_local", lambda: tree)()


def _finite(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or t.numel() == 0 or bool(torch.isfinite(t).all())


def read_data_states(path: Path, num_shards: int) -> dict[str, Any]:
    """All data-stream states of a DCP checkpoint, merged (``ShardedLoaders`` format)."""
    shards = {}
    for s in range(num_shards):
        file = Path(path) / "data" / f"shard_{s:05d}.json"
        try:
            shards[str(s)] = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read data state {file}: {e}") from e
    return {"num_shards": num_shards, "shards": shards}


# --- safe reading of DCP metadata -------------------------------------------------------------

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "ChunkStorageMetadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: every other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def safe_load_metadata(data: bytes) -> Any:
    """Unpickle DCP ``.metadata`` bytes with the allow-list; refuse byte (pickled) entries."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"not DCP metadata: {type(metadata).__name__}")
    entries = metadata.state_dict_metadata.items()
    pickled = [k for k, v in entries if isinstance(v, BytesStorageMetadata)]
    if pickled:
        raise pickle.UnpicklingError(f"checkpoint holds pickled (non-tensor) values: {pickled[:5]}")
    return metadata


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeFileSystemReader(FileSystemReader):
        """A ``FileSystemReader`` whose metadata is read with the allow-listed unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            path = self._get_metadata_path(kwargs.get("rank"))
            try:
                with self.fs.create_stream(path, "rb") as f:
                    metadata = safe_load_metadata(f.read())
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"unsafe or corrupt checkpoint metadata {path}: {e}") from e
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _SafeFileSystemReader


def SafeFileSystemReader(path: Path):  # noqa: N802 - a class factory (DCP is imported lazily)
    """A DCP storage reader for ``path`` that never unpickles anything but DCP metadata."""
    return _safe_reader_class()(str(path))


def load_single_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load a single-process (safetensors) checkpoint into a distributed model and optimizer.

    Every rank reads the full tensors; ``set_state_dict`` keeps the shards each rank owns.
    The optimizer's saved per-index state is mapped to parameter names by position (the
    optimizer is built by the same ``build_optimizer`` in both runs).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    from sparsefusion.checkpoint.store import unflatten_optimizer

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "model.safetensors"))
        extra = load_file(str(path / "optim.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    _, template = get_state_dict(model, optimizer)
    names = [n for group in template["param_groups"] for n in group["params"]]
    flat = unflatten_optimizer(extra, state["param_groups"])
    optim_sd = {
        "state": {names[i]: v for i, v in flat["state"].items()},
        "param_groups": [
            dict(g, params=[names[i] for i in g["params"]]) for g in flat["param_groups"]
        ],
    }
    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,
        optim_state_dict=optim_sd,
        options=StateDictOptions(full_state_dict=True),
    )
    return state
