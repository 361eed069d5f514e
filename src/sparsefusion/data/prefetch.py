"""Background loading: a rank's micro-batch streams produced ahead of the training step.

:class:`BatchStream` wraps the rank's :class:`~sparsefusion.data.shards.ShardedLoaders`. With
``workers=0`` it reads synchronously in the training thread. With ``workers >= 1``, worker
threads own the ``grad_accum`` streams (stream ``j`` belongs to worker ``j % workers``) and
keep up to ``prefetch`` ready batches per stream in a bounded queue: reading, encoding (the BPE
and the VQ encoder release the GIL), packing, an optional ``prepare`` and, on CUDA, the copy
into pinned memory all happen off the step. Each stream is still read in order by one
thread, so the batches are exactly those of the synchronous path.

Exact resume: every queued batch travels with a snapshot of its loader's state taken right after
it was cut; :meth:`BatchStream.state_dict` returns the snapshots of the batches the trainer
consumed, never of those still queued, so a checkpoint resumes at the next unconsumed batch.
Skipped-record counters are reported the same way. A worker's exception is raised again in the
trainer (the original exception, with a note naming the worker); a worker gone without one
raises a ``RuntimeError``. Workers are daemon threads stopped by :meth:`close`, so neither a
normal exit nor SIGTERM waits on them.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

import torch

from sparsefusion.data.batch import Batch
from sparsefusion.data.issues import DataIssues
from sparsefusion.data.loader import state_from_snapshot

_POLL_S = 0.2  # how often blocked queue operations look at the stop flag / worker liveness


class _Failure:
    """A worker's exception, queued in place of the batch it was producing."""

    def __init__(self, exc: BaseException, worker: int) -> None:
        self.exc, self.worker = exc, worker
        self.trace = "".join(traceback.format_exception(exc))


class BatchStream:
    """The micro-batch streams of one rank, optionally loaded in background threads.

    Args:
        loaders: the rank's ``ShardedLoaders`` (restore their state before the first batch).
        prepare: applied to every batch where it is produced (e.g. attaching the routing plan).
        workers: background threads (0: synchronous, in the caller's thread).
        prefetch: ready batches queued per stream (>= 1 when ``workers`` >= 1).
        pin_memory: copy batches into pinned host memory (for asynchronous CUDA copies).
    """

    def __init__(
        self,
        loaders: Any,
        *,
        prepare: Callable[[Batch], Batch] | None = None,
        workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool = False,
    ) -> None:
        if workers < 0 or (workers and prefetch < 1):
            raise ValueError(
                f"data.workers must be >= 0 and data.prefetch >= 1, got {workers}, {prefetch}"
            )
        self.loaders = loaders
        self.prepare = prepare or (lambda b: b)
        self.num_streams = len(loaders.loaders)
        self.workers = min(workers, self.num_streams)
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self._queues: list[queue.Queue] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._consumed: list[dict[str, Any]] | None = None  # snapshots of consumed batches

    # -- consumer side ----------------------------------------------------------------------

    def next_batch(self, micro: int) -> Batch:
        """The next batch of stream ``micro`` (0 <= micro < grad_accum), prepared."""
        if not self.workers:
            return self._produce(micro)[0]
        if not self._threads:
            self._start()
        item = self._get(micro)
        if isinstance(item, _Failure):
            self.close()
            item.exc.add_note(f"(raised in data worker {item.worker}; worker traceback:\n"
                              f"{item.trace})")  # fmt: skip
            raise item.exc
        batch, snapshot = item
        self._consumed[micro] = snapshot  # type: ignore[index]
        return batch

    def _get(self, micro: int) -> Any:
        thread = self._threads[micro % self.workers]
        while True:
            try:
                return self._queues[micro].get(timeout=_POLL_S)
            except queue.Empty:
                if not thread.is_alive() and self._queues[micro].empty():
                    self.close()
                    raise RuntimeError(
                        f"data worker {micro % self.workers} (stream {micro}) stopped without "
                        "producing a batch or an error"
                    ) from None

    def state_dict(self) -> dict[str, Any]:
        """The ``ShardedLoaders`` state as of the batches consumed so far."""
        if not self._threads:
            return self.loaders.state_dict()
        shards = {
            str(s): state_from_snapshot(snap)
            for s, snap in zip(self.loaders.shard_ids, self._consumed, strict=True)  # type: ignore[arg-type]
        }
        return {"num_shards": self.loaders.num_shards, "shards": shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loaders (only before the first batch)."""
        if self._threads:
            raise RuntimeError("BatchStream.load_state_dict after background loading started")
        self.loaders.load_state_dict(state)

    def issue_metrics(self) -> dict[str, int]:
        """Skipped-record counters as of the consumed batches (summed over streams)."""
        if not self._threads:
            return self.loaders.issue_metrics()
        total = DataIssues()
        for snap in self._consumed:  # type: ignore[union-attr]
            for reason, n in snap["skipped"].items():
                total.counts[reason] = total.counts.get(reason, 0) + n
        return total.metrics()

    def close(self) -> None:
        """Stop the workers (queued batches are dropped); safe to call more than once."""
        self._stop.set()
        for q in self._queues:
            _drain(q)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5.0)

    # -- producer side ----------------------------------------------------------------------

    def _start(self) -> None:
        self._consumed = [ld.snapshot() for ld in self.loaders.loaders]
        self._queues = [queue.Queue(maxsize=self.prefetch) for _ in range(self.num_streams)]
        for w in range(self.workers):
            t = threading.Thread(target=self._work, args=(w,), name=f"data-{w}", daemon=True)
            self._threads.append(t)
        for t in self._threads:
            t.start()

    def _produce(self, micro: int) -> tuple[Batch, dict[str, Any] | None]:
        loader = self.loaders.loaders[micro]
        batch = loader.next_batch()
        snapshot = loader.snapshot() if self.workers else None
        batch = self.prepare(batch)
        return (_pin(batch) if self.pin_memory else batch), snapshot

    def _work(self, worker: int) -> None:
        mine = list(range(worker, self.num_streams, self.workers))
        current = mine[0]
        try:
            while not self._stop.is_set():
                for micro in mine:
                    current = micro
                    if not self._put(micro, self._produce(micro)):
                        return
        except BaseException as e:  # noqa: BLE001 - handed to the trainer
            self._put(current, _Failure(e, worker))

    def _put(self, micro: int, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queues[micro].put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def _pin(batch: Batch) -> Batch:
    """``batch`` with its tensors in pinned host memory."""
    pinned = {
        f.name: getattr(batch, f.name).pin_memory()
        for f in fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return replace(batch, **pinned)
