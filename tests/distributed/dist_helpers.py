"""Run a function on several CPU processes joined by a gloo process group (tests only)."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world_size: int, port: int, args: tuple, errors) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo")
        fn(rank, world_size, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Done and torn down: leave without the interpreter's finalisation. A spawned child otherwise
    # runs C++ static destructors while c10d's store and gloo threads of the peer rank may still
    # be winding down, which now and then aborts a process that did everything right
    # ("terminate called without an active exception", exit code -6).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed_test(
    fn: Callable, world_size: int = 2, *, args: tuple[Any, ...] = (), timeout: float = 300
) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes (gloo).

    ``fn`` must be importable (a module-level function). Raises AssertionError with the failing
    rank's traceback when a process fails or does not finish within ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, args, errors))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    if not errors.empty():
        rank, tb = errors.get()
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    if hung:
        raise AssertionError(f"{len(hung)} process(es) did not finish within {timeout} s")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise AssertionError(f"process exit codes {bad}")
