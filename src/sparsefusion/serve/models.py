"""Models loaded once and kept; one generation at a time per model, with a bounded queue.

A model is a (run, checkpoint step) pair. Its :class:`ModelSlot` loads it on first use (under the
slot's lock, so it is loaded once), then runs one job at a time; at most ``1 + queue_size`` jobs
are admitted at once (one running, the rest waiting), and a job beyond that is refused with
:class:`QueueFull` (the API answers 503). Jobs run in worker threads, so the server keeps
answering other requests (other models, pages, plots) while a model generates.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from starlette.concurrency import run_in_threadpool

from sparsefusion.serve.params import FieldError, GenerateParams
from sparsefusion.serve.runs import RunInfo

if TYPE_CHECKING:
    from sparsefusion.generate import Sample

T = TypeVar("T")


class LoadedModel(Protocol):
    """What the server needs of a loaded model."""

    modes: list[str]

    def generate(self, params: GenerateParams) -> list[Sample]:
        """Samples for one request (each with ``segments``, ``new_tokens``, ``seconds``)."""
        ...


class Backend(Protocol):
    """Loads the model of a run at a checkpoint step."""

    def load(self, run: RunInfo, step: int) -> LoadedModel: ...


class QueueFull(RuntimeError):
    """A model's queue is full."""


class ModelSlot:
    """One model: loaded once, one job at a time, at most ``1 + queue_size`` jobs admitted.

    Args:
        loader: builds the model (called once, on the first job).
        queue_size: jobs that may wait while one runs.
    """

    def __init__(self, loader: Callable[[], LoadedModel], queue_size: int) -> None:
        self._loader = loader
        self._model: LoadedModel | None = None
        self._run_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._admitted = 0
        self.capacity = 1 + queue_size

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> LoadedModel | None:
        """The model once loaded, else None."""
        return self._model

    @property
    def admitted(self) -> int:
        """Jobs running or waiting now."""
        return self._admitted

    def _enter(self) -> None:
        with self._count_lock:
            if self._admitted >= self.capacity:
                raise QueueFull(f"{self._admitted} requests are running or waiting for this model")
            self._admitted += 1

    def _leave(self) -> None:
        with self._count_lock:
            self._admitted -= 1

    def _run(self, job: Callable[[LoadedModel], T]) -> T:
        with self._run_lock:
            if self._model is None:
                self._model = self._loader()
            return job(self._model)

    async def submit(self, job: Callable[[LoadedModel], T]) -> T:
        """Run ``job(model)`` in a worker thread after the jobs admitted before it.

        Raises:
            QueueFull: ``1 + queue_size`` jobs are already admitted.
        """
        self._enter()
        try:
            return await run_in_threadpool(self._run, job)
        finally:
            self._leave()


class ModelPool:
    """The slots of every model the server has been asked for, created on first request.

    Args:
        backend: loads models.
        queue_size: per-model queue length.
    """

    def __init__(self, backend: Backend, queue_size: int) -> None:
        self.backend = backend
        self.queue_size = queue_size
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
                self._slots[key] = ModelSlot(lambda: self.backend.load(run, step), self.queue_size)
            return step, self._slots[key]

    def loaded(self) -> list[tuple[str, int]]:
        """(run, step) of the models loaded so far."""
        with self._lock:
            return [key for key, slot in self._slots.items() if slot.loaded]
