"""Loss curves of a run, read from its ``metrics.jsonl`` (training rows and validation rows).

Legend: M = logged points of one split of one run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparsefusion.train.metrics import read_metrics

SPLITS = ("train", "val")


@dataclass
class SplitCurves:
    """One split of a run: logged steps, cumulative FLOPs and every ``loss*`` key.

    Attributes:
        step: logged optimizer steps, strictly increasing (M).
        flops: cumulative training FLOPs at those steps (M).
        losses: ``loss`` and ``loss/<modality>`` -> values (M), NaN where a row lacks the key.
    """

    step: np.ndarray
    flops: np.ndarray
    losses: dict[str, np.ndarray] = field(default_factory=dict)

    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(step, flops, loss)`` of one key, restricted to the points where it was logged."""
        y_M = self.losses[key]
        keep_M = np.isfinite(y_M)
        return self.step[keep_M], self.flops[keep_M], y_M[keep_M]


@dataclass
class RunCurves:
    """A run's curves per split (a split without rows is absent)."""

    name: str
    path: Path
    splits: dict[str, SplitCurves]


def metrics_path(run: str | Path) -> Path:
    """A run folder's ``metrics.jsonl`` (a path to the file itself is accepted too)."""
    path = Path(run)
    return path / "metrics.jsonl" if path.is_dir() else path


def load_run(run: str | Path, name: str | None = None) -> RunCurves:
    """Read a run's curves; a missing, empty or malformed file raises ValueError naming it.

    A truncated last line (a crash mid-write) is malformed JSON and is reported by
    :func:`~sparsefusion.train.metrics.read_metrics` with its file and line. If a step was logged
    twice (a resumed run whose old rows were not dropped), the later row wins.
    """
    path = metrics_path(run)
    if not Path(run).exists():
        raise ValueError(f"{run}: no such run folder or metrics file")
    if not path.is_file():
        raise ValueError(f"{path}: no metrics file (is {run} a run folder?)")
    rows = read_metrics(path)
    if not rows:
        raise ValueError(f"{path}: the metrics file is empty")
    by_split: dict[str, dict[int, dict]] = {s: {} for s in SPLITS}
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is not a JSON object")
        split = row.get("split", "train")
        if split not in by_split:
            continue
        for key in ("step", "flops"):
            if not isinstance(row.get(key), int | float) or isinstance(row.get(key), bool):
                raise ValueError(f"{path}: row {i} has no numeric '{key}'")
        by_split[split][int(row["step"])] = row
    splits = {s: _split_curves(rows) for s, rows in by_split.items() if rows}
    if "train" not in splits and "val" not in splits:
        raise ValueError(f"{path}: no training or validation rows")
    for split, curves in splits.items():
        if "loss" not in curves.losses:
            raise ValueError(f"{path}: {split} rows have no 'loss'")
        if curves.step[0] <= 0:
            raise ValueError(f"{path}: {split} rows start at step {int(curves.step[0])}")
        if curves.flops[-1] <= 0 or np.any(np.diff(curves.flops) < 0):
            raise ValueError(f"{path}: {split} 'flops' must be positive and cumulative")
    return RunCurves(name=name or _run_name(path), path=path, splits=splits)


def _split_curves(rows_by_step: dict[int, dict]) -> SplitCurves:
    steps = sorted(rows_by_step)
    rows = [rows_by_step[s] for s in steps]
    keys = sorted({k for r in rows for k in r if k == "loss" or k.startswith("loss/")})
    losses = {k: np.array([_number(r.get(k)) for r in rows], dtype=np.float64) for k in keys}
    return SplitCurves(
        step=np.array(steps, dtype=np.float64),
        flops=np.array([float(r["flops"]) for r in rows], dtype=np.float64),
        losses=losses,
    )


def _number(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return math.nan


def _run_name(path: Path) -> str:
    return path.parent.name if path.name == "metrics.jsonl" else path.stem
