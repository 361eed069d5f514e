"""Models loaded once and kept; requests to one model decode together in batches, bounded.

A model is a (run, checkpoint step) pair. Its :class:`ModelSlot` loads it on first use (once),
then runs its generation requests in batches: requests that arrive while a batch decodes wait and
join the next batch (at most ``max_batch`` requests in one), so concurrent clients share decode
steps instead of queueing behind each other. At most ``max_batch + queue_size`` requests are
admitted at once; one beyond that is refused with :class:`QueueFull` (the API answers 503 with
Retry-After). A request whose client goes away before its batch starts leaves the queue at once;
one that goes away during its batch has its rows ended at the next decode step. Batches run in a
worker thread, so the server keeps answering other requests (other models, pages, plots).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from starlette.concurrency import run_in_threadpool

from sparsefusion.serve.params import FieldError, GenerateParams
from sparsefusion.serve.runs import RunInfo

if TYPE_CHECKING:
    from sparsefusion.generate import Sample

T = TypeVar("T")


class LoadedModel(Protocol):
    """What the server needs of a loaded model (``generate_batch`` is optional)."""

    modes: list[str]

    def generate(self, params: GenerateParams) -> list[Sample]:
        """Samples for one request (each with ``segments``, ``new_tokens``, ``seconds``)."""
        ...


class Backend(Protocol):
    """Loads the model of a run at a checkpoint step."""

    def load(self, run: RunInfo, step: int) -> LoadedModel: ...


class QueueFull(RuntimeError):
    """A model's queue is full."""


@dataclass
class _Job:
    """One generation request waiting for (or in) a batch."""

    params: GenerateParams
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)


Generated = tuple[list[Any], float, float]  # samples, batch start, batch end (perf_counter)


class ModelSlot:
    """One model: loaded once, its requests decoded in batches of at most ``max_batch``.

    Args:
        loader: builds the model (called once, by the first batch or job).
        queue_size: requests that may wait besides a running batch.
        max_batch: requests decoded together (1: one at a time).
    """

    def __init__(
        self, loader: Callable[[], LoadedModel], queue_size: int, max_batch: int = 1
    ) -> None:
        if max_batch < 1 or queue_size < 0:
            raise ValueError(
                f"max_batch must be >= 1 and queue_size >= 0 ({max_batch}, {queue_size})"
            )
        self._loader = loader
        self._model: LoadedModel | None = None
        self._run_lock = threading.Lock()  # one batch or job on the model at a time
        self._lock = threading.Lock()  # the queue and the counts
        self._pending: list[_Job] = []
        self._worker = False
        self._admitted = 0
        self.max_batch = max_batch
        self.capacity = max_batch + queue_size
        self.batch_sizes: list[int] = []  # every batch run so far (GET /models, tests)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> LoadedModel | None:
        """The model once loaded, else None."""
        return self._model

    @property
    def admitted(self) -> int:
        """Requests running or waiting now."""
        return self._admitted

    @property
    def waiting(self) -> int:
        """Requests waiting for the next batch."""
        return len(self._pending)

    def _enter(self) -> None:
        with self._lock:
            if self._admitted >= self.capacity:
                raise QueueFull(f"{self._admitted} requests are running or waiting for this model")
            self._admitted += 1

    def _leave(self) -> None:
        with self._lock:
            self._admitted -= 1

    def _loaded(self) -> LoadedModel:
        if self._model is None:
            self._model = self._loader()
        return self._model

    def _run(self, job: Callable[[LoadedModel], T]) -> T:
        with self._run_lock:
            return job(self._loaded())

    async def submit(self, job: Callable[[LoadedModel], T]) -> T:
        """Run ``job(model)`` in a worker thread, between batches (e.g. reading its modes).

        Raises:
            QueueFull: ``max_batch + queue_size`` requests are already admitted.
        """
        self._enter()
        try:
            return await run_in_threadpool(self._run, job)
        finally:
            self._leave()

    async def generate(self, params: GenerateParams) -> Generated:
        """Samples for ``params``, decoded in the next batch with whatever else is waiting.

        Raises:
            QueueFull: ``max_batch + queue_size`` requests are already admitted.
            FieldError: the model cannot serve the request (e.g. its mode).
        """
        self._enter()
        job = _Job(params)
        with self._lock:
            self._pending.append(job)
            start, self._worker = not self._worker, True
        if start:
            threading.Thread(target=self._work, name="sparsefusion-batch", daemon=True).start()
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:  # the client went away
            job.cancelled.set()
            with self._lock:
                if job in self._pending:
                    self._pending.remove(job)
            raise
        finally:
            self._leave()

    def _work(self) -> None:
        """Run batches until nothing waits (the one worker of this slot)."""
        while True:
            with self._lock:
                batch = self._pending[: self.max_batch]
                del self._pending[: len(batch)]
                if not batch:
                    self._worker = False
                    return
            try:
                with self._run_lock:
                    self._run_batch(self._loaded(), batch)
            except BaseException as e:  # e.g. a damaged checkpoint: every job of the batch
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _run_batch(self, model: LoadedModel, batch: list[_Job]) -> None:
        jobs = []
        for job in batch:
            if job.params.mode not in model.modes:
                why = f"run {job.params.run!r} cannot serve {job.params.mode!r} ({model.modes})"
                job.future.set_exception(FieldError("mode", why))
            else:
                jobs.append(job)
        if not jobs:
            return
        self.batch_sizes.append(len(jobs))
        started = time.perf_counter()
        run_batch = getattr(model, "generate_batch", None)
        if run_batch is None or len(jobs) == 1:
            for job in jobs:
                t0 = time.perf_counter()
                _settle(job, lambda j=job: model.generate(j.params), t0)
            return
        results = run_batch([j.params for j in jobs], [j.cancelled for j in jobs])
        done = time.perf_counter()
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result((result, started, done))


def _settle(job: _Job, run: Callable[[], Sequence[Any]], started: float) -> None:
    try:
        samples = list(run())
    except Exception as e:
        job.future.set_exception(e)
        return
    job.future.set_result((samples, started, time.perf_counter()))


class ModelPool:
    """The slots of every model the server has been asked for, created on first request.

    Args:
        backend: loads models.
        queue_size: per-model queue length.
        max_batch: requests one model decodes together.
    """

    def __init__(self, backend: Backend, queue_size: int, max_batch: int = 1) -> None:
        self.backend = backend
        self.queue_size, self.max_batch = queue_size, max_batch
        self._slots: dict[tuple[str, int], ModelSlot] = {}
        self._lock = threading.Lock()

    def slot(self, run: RunInfo, step: int | None) -> tuple[int, ModelSlot]:
        """The checkpoint step and its slot: ``step`` (validated), or when None the newest valid
        checkpoint, damaged newer ones skipped as ``sparsefusion generate`` skips them.

        Raises:
            FieldError: 404 when the run has no checkpoint or not this one, 409 when its config
                cannot be read.
            CheckpointError: the named checkpoint is damaged or none is usable (the API
                answers 409 naming it).
        """
        steps = run.checkpoints()
        if not steps:
            raise FieldError("checkpoint", f"run {run.name!r} has no checkpoint yet", 404)
        if step is not None and step not in steps:
            raise FieldError(
                "checkpoint", f"run {run.name!r} has no checkpoint {step} (has {steps})", 404
            )
        try:
            step = run.usable_checkpoint(step)
        except (ValueError, OSError) as e:  # config.yaml unreadable or no longer valid
            raise FieldError("run", f"cannot open run {run.name!r}: {e}", 409) from None
        key = (run.name, step)
        with self._lock:
            if key not in self._slots:
                self._slots[key] = ModelSlot(
                    lambda: self.backend.load(run, step), self.queue_size, self.max_batch
                )
            return step, self._slots[key]

    def loaded(self) -> list[tuple[str, int]]:
        """(run, step) of the models loaded so far."""
        with self._lock:
            return [key for key, slot in self._slots.items() if slot.loaded]
