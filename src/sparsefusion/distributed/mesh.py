"""Process-group set-up from torchrun's environment, rank helpers and teardown.

``torchrun --nproc_per_node N -m sparsefusion train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous variables; :func:`init_distributed` turns them into a default
process group (NCCL on CUDA, gloo on CPU) and a one-dimensional device mesh. Without those
variables nothing is initialised and the run is a plain single process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("sparsefusion")


@dataclass
class DistEnv:
    """Where this process stands.

    Attributes:
        rank: global rank (0 in a single process).
        world_size: number of processes (1 in a single process).
        local_rank: rank on this node (selects the CUDA device).
        device: the device this rank trains on.
        mesh: the 1-D device mesh over all ranks (None in a single process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: Any = None

    @property
    def is_distributed(self) -> bool:
        """True when a process group is up (launched by torchrun with WORLD_SIZE > 1)."""
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that writes logs, metrics and checkpoint metadata)."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun's variables say this process is one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device, *, timeout_s: int = 600) -> DistEnv:
    """Initialise the default process group from torchrun's environment (no-op otherwise).

    Args:
        device: the device kind the run asked for (``cuda`` selects ``cuda:LOCAL_RANK``).
        timeout_s: collective timeout in seconds.

    Returns:
        The rank, world size, device and mesh of this process.
    """
    if not launched_by_torchrun():
        return DistEnv(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    env = DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, mesh=mesh)
    if not env.is_main:
        logging.getLogger("sparsefusion").setLevel(logging.WARNING)
    log.info("distributed: %d processes, backend %s, device %s", world, backend, device)
    return env


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op in a single process); returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (torchrun's ``RANK`` when no process group is up)."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
    else:
        rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(*args, **kwargs)


def teardown() -> None:
    """Destroy the default process group if one is up."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
