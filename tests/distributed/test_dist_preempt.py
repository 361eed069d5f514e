"""Under torchrun the ranks agree on preemption and on the run lock (2 gloo processes)."""

from __future__ import annotations

import signal

import pytest
from dist_helpers import run_distributed_test

pytestmark = pytest.mark.distributed


def _agree(rank: int, world_size: int, run_dir: str) -> None:
    from sparsefusion.distributed.mesh import DistEnv
    from sparsefusion.runtime import preempt, run_lock

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


def test_torchrun_sigterm_on_one_rank_saves_the_same_step_on_all(tmp_path, tokenizer_cache):
    import os
    import subprocess
    import sys

    from sparsefusion.checkpoint.dcp import is_dcp_checkpoint
    from sparsefusion.checkpoint.store import latest_checkpoint
    from sparsefusion.runtime.faults import ENV

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sparsefusion", "train", "mot-debug", f"run.dir={run_dir}",
           f"tokenizer.cache_dir={tokenizer_cache}", "dist.strategy=fsdp", "run.progress=log",
           "run.eval_every=0", "run.save_every=100", "train.steps=6", "train.threads=1",
           "data.batch_size=2"]  # fmt: skip
    env = dict(os.environ, **{ENV: "sigterm_at_step=3", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode != 0, err[-3000:]
    assert "exitcode  : 143" in err, err[-3000:]  # a worker exited with 128 + SIGTERM
    assert "SIGTERM: stopped after step 3" in err, err[-3000:]  # rank 0 was signalled
    ckpt = latest_checkpoint(run_dir)
    assert ckpt.name == "step_00000003" and is_dcp_checkpoint(ckpt)  # rank 1 joined the save
    assert sorted(p.name for p in (ckpt / "data").iterdir()) == ["shard_00000.json",
                                                                 "shard_00001.json"]  # fmt: skip
