"""The runs against the baseline at chosen steps, and the step from which each stays ahead.

A long study's final numbers hide its story: a sparse model can trail dense for thousands of
steps and end ahead. With ``compare.at_steps=[1200,2400,4800]`` the report gets, for the
validation and ``eval`` splits, one table per step (each run's value of each key there and its
difference from the baseline) and one "overtakes" table: per run and key, the first step from
which the run is ahead of the baseline at every later step both logged.

Values are the logged rows themselves (never smoothed): the last row at or before each step,
whose step is shown when it is not the step asked for. A curve whose last row comes before the
step (a run still training, or stopped early) has not reached it: its cell says so, with the
last step it logged, and holds no value (its last value would read as the value there).
"Ahead" is strictly lower, or strictly higher for a higher-is-better key (``clip_sf``,
``cider``).

Legend: N = logged points of the baseline curve, M = logged points of a run curve.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from sparsefusion.compare.curves import RunCurves, higher_is_better

MILESTONE_SPLITS = ("val", "eval")


@dataclass(frozen=True)
class Reading:
    """A curve's value at a step: the last logged row at or before it (both None when none)."""

    step: int | None
    value: float | None


@dataclass(frozen=True)
class Overtake:
    """Where a run gets ahead of the baseline for good.

    Attributes:
        step: the first shared step from which the run is ahead at every later shared step
            (None unless ``kind`` is ``from`` or ``from_start``).
        kind: ``from`` (it was behind before that step); ``from_start`` (ahead at every shared
            step); ``not_yet`` (behind or tied at the last shared step); ``none`` (no step
            logged by both).
        last_shared: the last step both curves logged (None with ``none``).
        partial: the shared steps end before the baseline's last step (a run still training):
            the finding holds only up to ``last_shared``.
    """

    step: int | None
    kind: Literal["from", "from_start", "not_yet", "none"]
    last_shared: int | None
    partial: bool = False

    def text(self) -> str:
        if self.kind == "none":
            return "n/a"
        if self.kind == "not_yet":
            return f"not by {self.last_shared}"
        text = f"from {self.step}" + (" (always)" if self.kind == "from_start" else "")
        return text + (f" (so far: to {self.last_shared})" if self.partial else "")


def value_at(step_M: np.ndarray, y_M: np.ndarray, step: int) -> Reading:
    """The last logged value at or before ``step``."""
    at_or_before = np.flatnonzero(np.asarray(step_M) <= step)
    if at_or_before.size == 0:
        return Reading(None, None)
    i = int(at_or_before[-1])
    return Reading(int(step_M[i]), float(y_M[i]))


def overtakes(
    base_step_N: np.ndarray,
    base_y_N: np.ndarray,
    run_step_M: np.ndarray,
    run_y_M: np.ndarray,
    *,
    higher_better: bool = False,
) -> Overtake:
    """The first step from which the run stays ahead of the baseline (see :class:`Overtake`)."""
    shared_S, base_i, run_i = np.intersect1d(base_step_N, run_step_M, return_indices=True)
    if shared_S.size == 0:
        return Overtake(None, "none", None)
    base_S, run_S = np.asarray(base_y_N)[base_i], np.asarray(run_y_M)[run_i]
    ahead_S = run_S > base_S if higher_better else run_S < base_S
    last = int(shared_S[-1])
    if not ahead_S[-1]:
        return Overtake(None, "not_yet", last)
    partial = last < int(np.asarray(base_step_N)[-1])
    behind = np.flatnonzero(~ahead_S)
    if behind.size == 0:
        return Overtake(int(shared_S[0]), "from_start", last, partial)
    return Overtake(int(shared_S[behind[-1] + 1]), "from", last, partial)


def _curve(run: RunCurves, split: str, key: str):
    curves = run.splits.get(split)
    if curves is None or key not in curves.losses:
        return None
    step_M, _, y_M = curves.curve(key)
    return (step_M, y_M) if y_M.size else None


def milestones(baseline: RunCurves, runs: list[RunCurves], at_steps: list[int]) -> dict[str, Any]:
    """JSON-ready: ``{split: {"keys": [...], "at": {step: {run: {key: reading}}},
    "overtakes": {run: {key: overtake}}}}`` for the splits the baseline logged."""
    out: dict[str, Any] = {}
    for split in MILESTONE_SPLITS:
        if split not in baseline.splits:
            continue
        keys = [k for k in baseline.splits[split].losses if _curve(baseline, split, k)]
        at: dict[int, dict[str, dict[str, Any]]] = {}
        for step in at_steps:
            at[step] = {}
            for run in [baseline, *runs]:
                row = {}
                for key in keys:
                    curve = _curve(run, split, key)
                    if curve is not None and step > curve[0][-1]:  # not there yet
                        row[key] = {"step": None, "value": None, "last_step": int(curve[0][-1])}
                        continue
                    reading = value_at(*curve, step) if curve else Reading(None, None)
                    row[key] = {"step": reading.step, "value": reading.value}
                at[step][run.name] = row
        ahead: dict[str, dict[str, Any]] = {}
        for run in runs:
            ahead[run.name] = {}
            for key in keys:
                curve = _curve(run, split, key)
                if curve is None:
                    found = Overtake(None, "none", None)
                else:
                    base = _curve(baseline, split, key)
                    found = overtakes(*base, *curve, higher_better=higher_is_better(key))
                ahead[run.name][key] = {**asdict(found), "text": found.text()}
        out[split] = {"keys": keys, "at": at, "overtakes": ahead}
    return out


def markdown_lines(data: dict[str, Any], baseline: str) -> list[str]:
    """The tables of :func:`milestones` as Markdown lines."""
    lines: list[str] = []
    for split, part in data.items():
        keys, title = part["keys"], "Validation" if split == "val" else "Evaluation"
        names = [short_key(k) for k in keys]
        for step, rows in part["at"].items():
            if all(r[k]["value"] is None for r in rows.values() for k in keys):
                continue  # nothing logged by then (a study evaluated only at its end)
            lines += [f"## {title} at step {step}", "", md_row(["run", *names]),
                      md_row(["---"] * (len(keys) + 1))]  # fmt: skip
            base = rows[baseline]
            for name, row in rows.items():
                cells = [_cell(row[k], base[k], step, name == baseline) for k in keys]
                lines.append(md_row([f"{name} (baseline)" if name == baseline else name, *cells]))
            lines.append("")
        lines += [f"## {title}: the step from which each run stays ahead of `{baseline}`", "",
                  md_row(["run", *names]), md_row(["---"] * (len(keys) + 1))]  # fmt: skip
        for name, row in part["overtakes"].items():
            lines.append(md_row([name, *[row[k]["text"] for k in keys]]))
        lines.append("")
    return lines


def _cell(reading: dict[str, Any], base: dict[str, Any], step: int, is_base: bool) -> str:
    if reading.get("last_step") is not None:
        return f"not reached (last {reading['last_step']})"
    if reading["value"] is None:
        return "n/a"
    text = _num(reading["value"])
    if reading["step"] != step:
        text += f" (step {reading['step']})"
    if not is_base and base["value"] is not None:
        text += f" ({_num(reading['value'] - base['value'], sign=True)})"
    return text


def _num(value: float, sign: bool = False) -> str:
    """4 decimals for losses, 1 for large metrics (``fid_sf``)."""
    return f"{value:{'+' if sign else ''}.{4 if abs(value) < 10 else 1}f}"


def short_key(key: str) -> str:
    """A column name: ``overall`` for ``loss``, the modality for ``loss/<modality>``."""
    return "overall" if key == "loss" else key.removeprefix("loss/")


def md_row(cells: list[str]) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(cells) + " |"
