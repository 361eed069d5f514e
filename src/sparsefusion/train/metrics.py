"""Metrics: one JSON object per logged step in ``metrics.jsonl``, mirrored to TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from sparsefusion.checkpoint.store import append_row, write_atomic
from sparsefusion.distributed.mesh import all_reduce_sum
from sparsefusion.objectives.forward import LoggedSums, StepOutput, means

log = logging.getLogger(__name__)


class MetricsLogger:
    """Appends rows to ``<run_dir>/metrics.jsonl`` and TensorBoard events under ``<run_dir>/tb``.

    On resume, rows newer than the restored step are dropped first (the file is rewritten
    atomically), so the file always reads like the log of one uninterrupted run. A row that
    cannot be written (full disk) is a :class:`DiskWriteError` naming the file, and the file is
    left ending in its last whole row.
    """

    def __init__(self, run_dir: Path, *, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        _truncate_after(self.path, resume_step)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1)
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                log.warning("tensorboard is not installed: TensorBoard events are off")

    def log(self, row: dict[str, Any]) -> None:
        """Write one row (must contain ``step``)."""
        append_row(self.path, row)
        if self._tb is not None:
            prefix = "val/" if row.get("split") == "val" else "train/"
            for key, value in row.items():
                if isinstance(value, int | float) and key not in ("step", "split"):
                    self._tb.add_scalar(prefix + key, value, row["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a row cut short by a crash
        row_step = row.get("step", 0) if isinstance(row, dict) else 0
        if not isinstance(row_step, int | float) or row_step <= step:
            kept.append(line)
    if len(kept) < len(lines) or not text.endswith("\n"):
        new = "".join(k + "\n" for k in kept)
        write_atomic(path, lambda tmp: tmp.write_text(new))


class LogWindow:
    """Accumulates the objective's logged sums between two logged steps (on device, no syncs)."""

    def __init__(self, tokens: int) -> None:
        self.reset(tokens)

    def reset(self, tokens: int) -> None:
        self.sums = LoggedSums()
        self.n = 0  # micro-batches
        self.steps = 0.0  # optimizer steps (micro-batches / grad_accum)
        self.aux: dict[str, torch.Tensor] = {}
        self.metrics: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        self.tokens0 = tokens

    def add(self, out: StepOutput, micro_batches: int) -> None:
        self.sums.add(out.objective)
        self.n += 1
        self.steps += 1.0 / micro_batches
        for k, v in out.model.aux_losses.items():  # router losses: mean per step
            self.aux[k] = self.aux.get(k, 0.0) + v.detach().double() / micro_batches
        self.metrics = out.model.metrics  # router metrics of the last micro-batch

    def row(self, position: dict[str, Any], *, lr: float, grad_norm: float) -> dict[str, Any]:
        """The logged row (sums over ranks) at ``position`` (step, tokens, ...), then reset."""
        names, totals = self.sums.totals()
        totals = all_reduce_sum(totals.clone())
        row: dict[str, Any] = dict(position)
        row.update(means(names, totals))
        if self.aux:
            aux_names = sorted(self.aux)
            aux = all_reduce_sum(torch.stack([self.aux[k] for k in aux_names]))
            scale = _world_size() * max(self.steps, 1e-9)
            row.update({k: v / scale for k, v in zip(aux_names, aux.cpu().tolist(), strict=True)})
        row.update({k: float(v) for k, v in self.metrics.items() if not k.endswith("/pairs")})
        elapsed = time.perf_counter() - self.t0
        row["lr"] = lr
        row["grad_norm"] = grad_norm
        row["tokens_per_s"] = (row["tokens"] - self.tokens0) / elapsed if elapsed > 0 else 0.0
        load = load_per_core()
        if load is not None:
            row["load"] = load
        self.reset(row["tokens"])
        return row


def load_per_core() -> float | None:
    """The machine's 1-minute load average per core this process may use (1.0: every core
    busy; above 1: runnable work waits), or None where the OS has none. Logged with each row so
    that ``compare`` can tell when wall-clock time was measured under different loads."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return load / max(1, cores or 1)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


class NullMetrics:
    """Metrics sink of ranks other than 0 (rank 0 alone writes files)."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
