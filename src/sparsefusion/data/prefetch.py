"""Background loading: a rank's micro-batch streams produced ahead of the training step.

:class:`BatchStream` wraps the rank's :class:`~sparsefusion.data.shards.ShardedLoaders`. With
``workers=0`` it reads synchronously in the training thread. With ``workers >= 1``, workers own
the ``grad_accum`` streams (stream ``j`` belongs to worker ``j % workers``) and keep up to
``prefetch`` ready batches per stream in a bounded queue: reading, encoding, packing and an
optional ``prepare`` happen off the step; on CUDA the batches land in pinned memory. Each stream
is still read in order by one worker, so the batches are exactly those of the synchronous path.

Workers are processes (``kind="process"``, forked with the loaders' state: no GIL shared with
the training thread, which matters for the Python-heavy BPE and image decoding) or threads
(``kind="thread"``).

Exact resume: every queued batch travels with a snapshot of its loader's state taken right after
it was cut; :meth:`BatchStream.state_dict` returns the snapshots of the batches the trainer
consumed, never of those still queued, so a checkpoint resumes at the next unconsumed batch.
Skipped-record counters are reported the same way. A worker's exception is raised again in the
trainer with its message and the worker's traceback (a ``ValueError``, the input errors of a
damaged token shard among them, stays a ``ValueError``); a worker that dies (killed, out of memory)
raises a ``RuntimeError`` naming it and its exit code. Workers are daemons, stopped by
:meth:`close`; worker processes ignore SIGTERM/SIGINT (the trainer's preemption save handles
them and then stops the workers) and exit by themselves when the trainer is gone.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import traceback
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

import numpy as np
import torch

from sparsefusion.data.batch import Batch
from sparsefusion.data.issues import BadInput, DataIssues
from sparsefusion.data.loader import state_from_snapshot

log = logging.getLogger("sparsefusion")

_POLL_S = 0.2  # how often blocked queue operations look at the stop flag / worker liveness
KINDS = ("process", "thread")
# data.* keys a resumed run may change (how batches are loaded, not which ones)
LOADING_KEYS = ("workers", "prefetch", "worker_kind", "worker_nice")


def resolve_workers(workers: int | str, device: torch.device) -> int:
    """The number of background workers ``data.workers`` asks for (``auto`` resolved).

    ``auto`` is one worker, except for CPU training whose torch threads already use every core
    this process may run on: there a worker gets no core of its own and every batch it makes
    preempts the step's compute threads (measured on 2 cores: 3-4% slower steps than loading in
    the training thread, ``docs/benchmarks.md``), so batches load in the training thread.
    """
    if workers != "auto":
        return int(workers)
    if device.type != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 1 if (cores or 1) > torch.get_num_threads() else 0


class _Failure:
    """A worker's exception, queued in place of the batch it was producing (picklable)."""

    def __init__(self, exc: BaseException, worker: int, *, keep: bool) -> None:
        self.exc = exc if keep else None  # threads hand over the exception object itself
        self.name, self.message = type(exc).__name__, str(exc)
        self.bad_input = (exc.reason, exc.where, exc.detail) if isinstance(exc, BadInput) else None
        self.value_error = isinstance(exc, ValueError)  # a user-input error stays one
        self.worker = worker
        self.trace = "".join(traceback.format_exception(exc))

    def exception(self) -> BaseException:
        if self.exc is not None:
            exc = self.exc
        elif self.bad_input is not None:
            exc = BadInput(*self.bad_input)
        elif self.value_error:
            exc = ValueError(self.message)
        else:
            exc = RuntimeError(f"data worker {self.worker} failed: {self.name}: {self.message}")
        exc.add_note(f"(raised in data worker {self.worker}; its traceback:\n{self.trace})")
        return exc


class BatchStream:
    """The micro-batch streams of one rank, optionally loaded by background workers.

    Args:
        loaders: the rank's ``ShardedLoaders`` (restore their state before the first batch).
        prepare: applied to every batch where it is produced.
        workers: background workers (0: synchronous, in the caller's thread).
        prefetch: ready batches queued per stream (>= 1 when ``workers`` >= 1).
        pin_memory: hand out batches in pinned host memory (for asynchronous CUDA copies).
        kind: ``process`` or ``thread`` workers.
        nice: niceness added to process workers (they yield the cores to the training step).
    """

    def __init__(
        self,
        loaders: Any,
        *,
        prepare: Callable[[Batch], Batch] | None = None,
        workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool = False,
        kind: str = "process",
        nice: int = 0,
    ) -> None:
        if workers < 0 or (workers and prefetch < 1) or kind not in KINDS:
            raise ValueError(
                f"data.workers must be >= 0, data.prefetch >= 1 and data.worker_kind one of "
                f"{KINDS}, got {workers}, {prefetch}, {kind!r}"
            )
        self.loaders = loaders
        self.prepare = prepare
        self.num_streams = len(loaders.loaders)
        self.workers = min(workers, self.num_streams)
        if workers > self.num_streams:
            log.warning(
                "data.workers=%d but this rank has %d data stream(s) (train.grad_accum); one "
                "worker per stream: using %d", workers, self.num_streams, self.workers,
            )  # fmt: skip
        self.prefetch, self.pin_memory, self.kind, self.nice = prefetch, pin_memory, kind, nice
        self._queues: list[Any] = []
        self._procs: list[Any] = []  # threads or processes
        self._stop: Any = None
        self._consumed: list[dict[str, Any]] = []  # loader snapshots of the consumed batches

    # -- consumer side ----------------------------------------------------------------------

    def next_batch(self, micro: int) -> Batch:
        """The next batch of stream ``micro`` (0 <= micro < grad_accum)."""
        if not self.workers:
            return _produce(self.loaders.loaders[micro], self.prepare, self.pin_memory)[0]
        if not self._procs:
            self._start()
        item = self._get(micro)
        if isinstance(item, _Failure):
            self.close()
            raise item.exception()
        if self.kind == "process":
            batch, snapshot = _from_wire(item)
            batch = _pin(batch) if self.pin_memory else batch  # pinned pages stay in a process
        else:
            batch, snapshot = item
        self._consumed[micro] = snapshot
        return batch

    def _get(self, micro: int) -> Any:
        w = micro % self.workers
        while True:
            try:
                return self._queues[micro].get(timeout=_POLL_S)
            except queue.Empty:
                if not self._procs[w].is_alive() and self._queues[micro].empty():
                    code = getattr(self._procs[w], "exitcode", None)
                    self.close()
                    raise RuntimeError(
                        f"data worker {w} (stream {micro}) died without producing a batch or an "
                        f"error" + (f" (exit code {code})" if code is not None else "")
                    ) from None

    def state_dict(self) -> dict[str, Any]:
        """The ``ShardedLoaders`` state as of the batches consumed so far."""
        if not self._procs:
            return self.loaders.state_dict()
        shards = {
            str(s): state_from_snapshot(snap)
            for s, snap in zip(self.loaders.shard_ids, self._consumed, strict=True)
        }
        return {"num_shards": self.loaders.num_shards, "shards": shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loaders (only before the first batch)."""
        if self._procs:
            raise RuntimeError("BatchStream.load_state_dict after background loading started")
        self.loaders.load_state_dict(state)

    def issue_metrics(self) -> dict[str, int]:
        """Skipped-record counters as of the consumed batches (summed over streams)."""
        if not self._procs:
            return self.loaders.issue_metrics()
        total = DataIssues()
        for snap in self._consumed:
            for reason, n in snap["skipped"].items():
                total.counts[reason] = total.counts.get(reason, 0) + n
        return total.metrics()

    def close(self) -> None:
        """Stop the workers (queued batches are dropped); safe to call more than once."""
        if self._stop is None:
            return
        self._stop.set()
        if self.kind == "thread":
            for q in self._queues:
                _drain(q)
        for p in self._procs:
            if p is not threading.current_thread():
                p.join(timeout=5.0)
            if self.kind == "process" and p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        for q in self._queues:
            if self.kind == "process":
                q.cancel_join_thread()  # never block exit on undelivered batches
                q.close()

    # -- producer side ----------------------------------------------------------------------

    def _start(self) -> None:
        self._consumed = [ld.snapshot() for ld in self.loaders.loaders]
        if self.kind == "thread":
            make_queue, make_worker, self._stop = queue.Queue, threading.Thread, threading.Event()
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            make_queue, make_worker, self._stop = ctx.Queue, ctx.Process, ctx.Event()
        self._queues = [make_queue(maxsize=self.prefetch) for _ in range(self.num_streams)]
        for w in range(self.workers):
            mine = list(range(w, self.num_streams, self.workers))
            args = (w, [self.loaders.loaders[j] for j in mine], [self._queues[j] for j in mine],
                    self._stop, self.prepare, self.pin_memory and self.kind == "thread",
                    None if self.kind == "thread" else os.getpid(), self.nice)  # fmt: skip
            self._procs.append(make_worker(target=_work, args=args, name=f"data-{w}", daemon=True))
        for p in self._procs:
            p.start()


def _produce(loader: Any, prepare, pin: bool) -> tuple[Batch, dict[str, Any]]:
    batch = loader.next_batch()
    snapshot = loader.snapshot()
    if prepare is not None:
        batch = prepare(batch)
    return (_pin(batch) if pin else batch), snapshot


def _work(worker, loaders, queues, stop, prepare, pin, parent_pid, nice=0) -> None:
    """A worker's loop: produce the next batch of each of its streams in turn.

    ``parent_pid``: the training process (None for a thread worker, which lives inside it).
    ``nice``: niceness a process worker adds to itself.
    """
    if parent_pid is not None:
        torch.set_num_threads(1)
        if nice:
            os.nice(nice)
        # SIGTERM/SIGINT sent to the whole job are the trainer's to handle (it finishes the step,
        # saves, then stops us); a worker keeps feeding it meanwhile.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    current, failed = 0, False
    try:
        while not stop.is_set():
            for current, loader in enumerate(loaders):
                item = _produce(loader, prepare, pin)
                if parent_pid is not None:
                    item = _to_wire(item)
                if not _put(queues[current], item, stop, parent_pid):
                    return
    except BaseException as e:  # noqa: BLE001 - handed to the trainer
        failed = _put(queues[current], _Failure(e, worker, keep=parent_pid is None), stop,
                      parent_pid)  # fmt: skip
    finally:
        # Leaving with batches still buffered: do not wait to deliver them (the trainer stopped
        # us or is gone); a queued failure, though, must reach the trainer.
        if parent_pid is not None and not failed:
            for q in queues:
                q.cancel_join_thread()


def _put(q: Any, item: Any, stop: Any, parent_pid: int | None) -> bool:
    """Put ``item`` unless stopped or orphaned (returns whether it was queued)."""
    while not stop.is_set() and (parent_pid is None or os.getppid() == parent_pid):
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _to_wire(item: tuple[Batch, dict[str, Any]]) -> tuple[dict, dict]:
    """Numpy copies of a batch and its snapshot: pickled by value through the queue's pipe
    (torch's shared-memory tensors would need the worker alive when they are unpickled)."""
    batch, snap = item
    arrays = {f.name: _np(getattr(batch, f.name)) for f in fields(batch)}
    return arrays, {**snap, "buffer": {k: _np(v) for k, v in snap["buffer"].items()}}


def _from_wire(item: tuple[dict, dict]) -> tuple[Batch, dict[str, Any]]:
    arrays, snap = item
    batch = Batch(**{k: _tensor(v) for k, v in arrays.items()})
    return batch, {**snap, "buffer": {k: _tensor(v) for k, v in snap["buffer"].items()}}


def _np(v: Any) -> Any:
    return v.numpy() if isinstance(v, torch.Tensor) else v


def _tensor(v: Any) -> Any:
    return torch.from_numpy(v) if isinstance(v, np.ndarray) else v


def _drain(q: Any) -> None:
    while True:
        try:
            q.get_nowait()
        except (queue.Empty, OSError, ValueError):
            return


def _pin(batch: Batch) -> Batch:
    """``batch`` with its tensors in pinned host memory."""
    pinned = {
        f.name: getattr(batch, f.name).pin_memory()
        for f in fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return replace(batch, **pinned)
