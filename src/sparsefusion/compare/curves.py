"""Curves of a run: its ``metrics.jsonl`` (training and validation rows) and, when the run folder
holds one, its ``eval.jsonl`` (``sparsefusion eval`` rows: the ``eval`` split).

Every row may carry ``elapsed_s`` (cumulative wall-clock seconds of training), kept beside the
step and FLOPs so that curves can also be matched on time. Rows whose loss (or eval metric) is
not a finite number (NaN, infinite, null, or not a number at all: the string ``"NaN"``,
``true``) are not dropped silently: :attr:`RunCurves.nonfinite` records, per split, where
they start and how many there are, and the report prints it.

Legend: M = logged points of one split of one run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparsefusion.runs.folder import read_metrics

SPLITS = ("train", "val", "eval")
# eval.jsonl metrics compared by `compare`; every other numeric eval key is ignored
HIGHER_IS_BETTER = ("clip_sf", "cider")
EVAL_KEYS = ("fid_sf", "clip_sf", "cider")
EVAL_PREFIXES = ("loss/causal",)  # batch-routed loss is the val split already


def is_curve_key(split: str, key: str) -> bool:
    """Whether ``key`` of a ``split`` row is a compared curve."""
    if split == "eval":
        return key in EVAL_KEYS or key.startswith(EVAL_PREFIXES)
    return key == "loss" or key.startswith("loss/")


def higher_is_better(key: str) -> bool:
    return key in HIGHER_IS_BETTER


@dataclass
class SplitCurves:
    """One split of a run: logged steps, cumulative FLOPs, wall-clock time and every curve key.

    Attributes:
        step: logged optimizer steps, strictly increasing (M).
        flops: cumulative training FLOPs at those steps (M).
        losses: ``loss`` and ``loss/<modality>`` (eval split: ``fid_sf``, ``clip_sf``, ``cider``,
            ``loss/causal*``) -> values (M), NaN where a row lacks the key or its
            value is not finite.
        elapsed: cumulative training seconds (``elapsed_s``) at those steps (M), NaN where absent.
    """

    step: np.ndarray
    flops: np.ndarray
    losses: dict[str, np.ndarray] = field(default_factory=dict)
    elapsed: np.ndarray | None = None

    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(step, flops, loss)`` of one key, restricted to the points where it was logged."""
        y_M = self.losses[key]
        keep_M = np.isfinite(y_M)
        return self.step[keep_M], self.flops[keep_M], y_M[keep_M]

    def elapsed_of(self, key: str) -> np.ndarray:
        """``elapsed_s`` at the points of :meth:`curve` (NaN where a row had none)."""
        elapsed_M = self.elapsed if self.elapsed is not None else np.full(self.step.shape, np.nan)
        return elapsed_M[np.isfinite(self.losses[key])]


@dataclass(frozen=True)
class NonFinite:
    """Rows of a split whose curve values are NaN or infinite.

    Attributes:
        first_step: the step of the first such row.
        rows: how many rows.
        keys: the keys that were not finite.
        last_finite_step: the last step before ``first_step`` with every value finite (None if
            the split starts non-finite).
    """

    first_step: int
    rows: int
    keys: tuple[str, ...]
    last_finite_step: int | None

    def text(self, split: str) -> str:
        before = (
            f"; the last finite row before it is step {self.last_finite_step}"
            if self.last_finite_step is not None
            else ""
        )
        return (
            f"{split}: non-finite {', '.join(self.keys)} from step {self.first_step} "
            f"({self.rows} row(s)): the run diverged there{before}; only finite rows are compared"
        )


@dataclass
class RunCurves:
    """A run's curves per split (a split without rows is absent), its non-finite rows, and the
    mean machine load per core while it trained (training rows' ``load``; None if unlogged)."""

    name: str
    path: Path
    splits: dict[str, SplitCurves]
    nonfinite: dict[str, NonFinite] = field(default_factory=dict)
    load: float | None = None


def metrics_path(run: str | Path) -> Path:
    """A run folder's ``metrics.jsonl`` (a path to the file itself is accepted too)."""
    path = Path(run)
    return path / "metrics.jsonl" if path.is_dir() else path


def load_run(run: str | Path, name: str | None = None, *, eval_size: str = "auto") -> RunCurves:
    """Read a run's curves; a missing, empty or malformed file raises ValueError naming it.

    A truncated last line (a crash mid-write) is malformed JSON and is reported by
    :func:`~sparsefusion.train.metrics.read_metrics` with its file and line. If a step was logged
    twice (a resumed run whose old rows were not dropped), the later row wins. Rows may start at
    step 0 (an evaluation before training). ``eval_size`` picks the ``eval.jsonl`` rows
    (``small``: the in-training evaluation, ``full``: ``sparsefusion eval``; ``auto``: ``small``
    when there are any, else ``full``).
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
        if split not in by_split or split == "eval":
            continue
        _check_numeric(row, path, i)
        by_split[split][int(row["step"])] = row
    by_split["eval"] = _eval_rows(path.parent / "eval.jsonl", eval_size)
    splits = {s: _split_curves(s, rows) for s, rows in by_split.items() if rows}
    if "train" not in splits and "val" not in splits:
        raise ValueError(f"{path}: no training or validation rows")
    for split, curves in splits.items():
        if split != "eval" and "loss" not in curves.losses:
            raise ValueError(f"{path}: {split} rows have no 'loss'")
        if curves.step[0] < 0:
            raise ValueError(f"{path}: {split} rows start at step {int(curves.step[0])}")
        no_flops = curves.flops[-1] <= 0 and split != "eval"  # one eval row at step 0 is fine
        if no_flops or np.any(np.diff(curves.flops) < 0) or curves.flops[0] < 0:
            raise ValueError(f"{path}: {split} 'flops' must be positive and cumulative")
    nonfinite = {s: nf for s, rows in by_split.items() if rows and (nf := _nonfinite(s, rows))}
    return RunCurves(
        name=name or _run_name(path),
        path=path,
        splits=splits,
        nonfinite=nonfinite,
        load=_mean_load(by_split["train"].values()),
    )


def _mean_load(rows) -> float | None:
    loads = [v for r in rows if _is_num(v := r.get("load")) and math.isfinite(v) and v >= 0]
    return sum(loads) / len(loads) if loads else None


def _check_numeric(row: dict, path: Path, i: int) -> None:
    for key in ("step", "flops"):
        if not isinstance(row.get(key), int | float) or isinstance(row.get(key), bool):
            raise ValueError(f"{path}: row {i} has no numeric '{key}'")


def _eval_rows(path: Path, eval_size: str) -> dict[int, dict]:
    """Rows of ``eval.jsonl`` of one size, by step (the later row of a step wins)."""
    if eval_size not in ("auto", "small", "full"):
        raise ValueError(f"compare.eval_size must be auto, small or full, got {eval_size!r}")
    if not path.is_file():
        return {}
    rows = read_metrics(path)
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is not a JSON object")
        _check_numeric(row, path, i)
    if eval_size == "auto":
        eval_size = "small" if any(r.get("size") == "small" for r in rows) else "full"
    return {int(r["step"]): r for r in rows if r.get("size", "full") == eval_size}


def _nonfinite(split: str, rows_by_step: dict[int, dict]) -> NonFinite | None:
    bad_steps, keys, last_good = [], set(), None
    for step in sorted(rows_by_step):
        row = rows_by_step[step]
        bad = {
            k
            for k, v in row.items()
            if is_curve_key(split, k) and not (_is_num(v) and math.isfinite(v))
        }
        if bad:
            bad_steps.append(step)
            keys |= bad
        elif not bad_steps:
            last_good = step
    if not bad_steps:
        return None
    return NonFinite(bad_steps[0], len(bad_steps), tuple(sorted(keys)), last_good)


def _is_num(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _split_curves(split: str, rows_by_step: dict[int, dict]) -> SplitCurves:
    steps = sorted(rows_by_step)
    rows = [rows_by_step[s] for s in steps]
    keys = sorted({k for r in rows for k in r if is_curve_key(split, k)})
    losses = {k: np.array([_number(r.get(k)) for r in rows], dtype=np.float64) for k in keys}
    return SplitCurves(
        step=np.array(steps, dtype=np.float64),
        flops=np.array([float(r["flops"]) for r in rows], dtype=np.float64),
        losses=losses,
        elapsed=np.array([_number(r.get("elapsed_s")) for r in rows], dtype=np.float64),
    )


def _number(value: object) -> float:
    if _is_num(value) and math.isfinite(value):  # type: ignore[arg-type]
        return float(value)  # type: ignore[arg-type]
    return math.nan


def _run_name(path: Path) -> str:
    return path.parent.name if path.name == "metrics.jsonl" else path.stem
