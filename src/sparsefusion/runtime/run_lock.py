"""An exclusive lock on a run folder, so that two trainers never write into the same run.

The lock is ``<run_dir>/train.lock``, held with ``flock`` by rank 0 for the whole run; it names
its owner (host, PID, start time). The kernel releases it when the owner exits, however it exits,
so a lock left by a killed trainer is stale by construction: the next trainer takes it over (and
logs whose it was). A second trainer while the first runs is refused with a message naming the
owner. On NFS, Linux maps ``flock`` onto NFS byte-range locks, which work across hosts.

Shape legend: none.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("sparsefusion")

LOCK_NAME = "train.lock"


class RunLocked(ValueError):
    """The run folder is in use by another trainer."""


def acquire(run_dir: str | os.PathLike[str]) -> int:
    """Take the lock of ``run_dir`` (created if needed); returns the open descriptor.

    Raises:
        RunLocked: another live process holds it.
    """
    path = Path(run_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = _owner(fd)
        os.close(fd)
        raise RunLocked(
            f"run folder {Path(run_dir)} is in use by another trainer ({owner}; lock {path}). "
            "Two trainers on one run folder would corrupt it: wait for that one to finish, stop "
            "it, or use another run.dir"
        ) from None
    stale = _owner(fd)
    if stale != "owner unknown":
        log.warning("run folder %s: taking over the stale lock of %s (it is gone)", run_dir, stale)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    return fd


def release(fd: int) -> None:
    """Clear the owner and release the lock (the file stays: removing it would race)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike[str], env: Any) -> Iterator[None]:
    """Hold the run folder's lock for a block (rank 0 locks; every rank learns the outcome).

    Raises:
        RunLocked: on every rank, when rank 0 could not take the lock.
    """
    fd, error = None, ""
    if env.is_main:
        try:
            fd = acquire(run_dir)
        except RunLocked as e:
            error = str(e)
    if env.is_distributed:
        flag = torch.tensor([1.0 if error else 0.0], device=env.device)
        torch.distributed.all_reduce(flag)
        if flag.item() and not error:
            error = f"run folder {run_dir} is in use by another trainer (see rank 0's message)"
    if error:
        raise RunLocked(error)
    try:
        yield
    finally:
        if fd is not None:
            release(fd)


def _owner(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"null")
        return f"host {info['host']}, PID {info['pid']}"
    except (OSError, ValueError, TypeError, KeyError):
        return "owner unknown"
