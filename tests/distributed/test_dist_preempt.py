"""Under torchrun the ranks agree on preemption and on the run lock (2 gloo processes)."""

from __future__ import annotations

import signal

import pytest
from dist_helpers import run_distributed_test


def _agree(rank: int, world_size: int, run_dir: str) -> None:
    from sparsefusion.distributed.mesh import DistEnv
    from sparsefusion.train import preempt, run_lock

    env = DistEnv(rank=rank, world_size=world_size, mesh=object())  # a process group is up
    assert preempt.stop_requested(1, env) is False
    if rank == 1:  # only rank 1 was signalled
        preempt._state.requested = signal.SIGTERM
    assert preempt.stop_requested(2, env) is True, rank
    held = run_lock.acquire(run_dir) if rank == 1 else None  # someone else holds the folder
    import torch.distributed as dist

    dist.barrier()
    with pytest.raises(run_lock.RunLocked, match="in use by another trainer"):
        with run_lock.hold(run_dir, env):
            pass
    dist.barrier()
    if held is not None:
        run_lock.release(held)


def test_ranks_agree_on_stopping_and_on_the_lock(tmp_path):
    run_distributed_test(_agree, world_size=2, args=(str(tmp_path),))
