"""Metrics: one JSON object per logged step in ``metrics.jsonl``, mirrored to TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLogger:
    """Appends rows to ``<run_dir>/metrics.jsonl`` and TensorBoard events under ``<run_dir>/tb``.

    On resume, rows newer than the restored step are dropped first, so the file always reads like
    the log of one uninterrupted run.
    """

    def __init__(self, run_dir: Path, *, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        _truncate_after(self.path, resume_step)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1)
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                log.warning("tensorboard is not installed: TensorBoard events are off")

    def log(self, row: dict[str, Any]) -> None:
        """Write one row (must contain ``step``)."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            prefix = "val/" if row.get("split") == "val" else "train/"
            for key, value in row.items():
                if isinstance(value, int | float) and key not in ("step", "split"):
                    self._tb.add_scalar(prefix + key, value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file; a malformed line raises ValueError naming file and line."""
    rows = []
    with Path(path).open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed metrics row: {e}") from e
    return rows


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a row cut short by a crash
        if row.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(k + "\n" for k in kept))
