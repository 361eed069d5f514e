"""``sparsefusion compare``: every run against a baseline, as a Markdown table, JSON and PNG plots.

For each run, each split (training, validation, and ``eval``: the rows of ``eval.jsonl``) and
each key the baseline logs (``loss``, ``loss/<modality>``; ``fid_sf``, ``clip_sf``, ``cider``,
``loss/causal*``): the FLOPs savings factor, the step-matching slope, the same two
against wall-clock time (``elapsed_s``, MoT's Figure 19), and per split the "x% checkpoint".
With ``at_steps``, the values at those steps and when each run gets ahead for good
(:mod:`sparsefusion.compare.milestones`).
``clip_sf`` and ``cider`` are higher-is-better: a run "reaches" a level when it is at or above it.
Non-finite rows (a diverged run) are reported with the step where they start. The math and its
documented choices are in :mod:`sparsefusion.compare.savings`.

Legend: N = logged points of the baseline curve, M = logged points of a run curve.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsefusion.compare.curves import SPLITS, RunCurves, SplitCurves, higher_is_better, load_run
from sparsefusion.compare.milestones import markdown_lines, md_row, milestones, short_key
from sparsefusion.compare.savings import (
    CompareConfig,
    Estimate,
    StepMatch,
    checkpoint_point,
    ema,
    flops_per_step,
    match_steps,
    savings_factor,
)
from sparsefusion.config import to_dict

log = logging.getLogger(__name__)

SPLIT_TITLES = {"train": "Training loss", "val": "Validation loss", "eval": "Evaluation metrics"}
Curve = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # step, flops, value, elapsed_s


LOAD_RATIO = 1.25  # mean loads further apart than this make wall-clock comparisons unsound


@dataclass
class KeyResult:
    """One key of one split of one run: savings factor and step matching, on FLOPs/steps and on
    wall-clock time."""

    baseline_final: float
    savings: Estimate
    match: StepMatch | None = None
    time_savings: Estimate = field(default_factory=lambda: Estimate(None, "none", "no elapsed_s"))
    time_match: StepMatch | None = None


@dataclass
class RunResult:
    """One run against the baseline."""

    run: RunCurves
    flops_per_step: float
    flops_ratio: float
    warnings: list[str] = field(default_factory=list)
    keys: dict[str, dict[str, KeyResult]] = field(default_factory=dict)
    checkpoint: dict[str, Estimate] = field(default_factory=dict)
    checkpoint_step: dict[str, int | None] = field(default_factory=dict)


@dataclass
class Comparison:
    """All runs against the baseline, plus the smoothed curves the numbers were read from."""

    baseline: RunCurves
    runs: list[RunResult]
    cfg: CompareConfig
    smoothed: dict[str, dict[str, dict[str, Curve]]]
    rising: dict[str, dict[str, tuple[float, int]]] = field(default_factory=dict)
    milestones: dict[str, Any] = field(default_factory=dict)


def smoothed_curves(run: RunCurves, cfg: CompareConfig) -> dict[str, dict[str, Curve]]:
    """split -> key -> ``(step, flops, smoothed value, elapsed_s)`` over the points where the key
    was logged (``elapsed_s`` all NaN unless every such point has it)."""
    out: dict[str, dict[str, Curve]] = {}
    for split, curves in run.splits.items():
        a = cfg.smoothing if split == "train" else cfg.val_smoothing
        out[split] = {}
        for key in curves.losses:
            step_M, flops_M, y_M = curves.curve(key)
            t_M = curves.elapsed_of(key)
            t_M = ema(t_M, a) if np.all(np.isfinite(t_M)) else np.full(t_M.shape, np.nan)
            if y_M.size:  # x smoothed with y: each point is a weighted mean, no lag
                out[split][key] = (ema(step_M, a), ema(flops_M, a), ema(y_M, a), t_M)
    return out


def compare_runs(baseline: RunCurves, runs: list[RunCurves], cfg: CompareConfig) -> Comparison:
    """Compare every run with the baseline (see the module docstring)."""
    smoothed = {r.name: smoothed_curves(r, cfg) for r in [baseline, *runs]}
    base_curves = smoothed[baseline.name]
    base_fps = _flops_per_step(baseline)
    results = []
    for run in runs:
        fps = _flops_per_step(run)
        result = RunResult(run=run, flops_per_step=fps, flops_ratio=fps / base_fps)
        _check_comparable(baseline, run, result, cfg)
        for split, base_keys in base_curves.items():
            run_keys = smoothed[run.name].get(split)
            if run_keys is None:
                result.warnings.append(f"no {split} rows: {split} not compared")
                continue
            result.keys[split] = _compare_split(base_keys, run_keys, cfg)
            extra = sorted(set(run_keys) - set(base_keys))
            if extra:
                result.warnings.append(f"{split}: {', '.join(extra)} not in the baseline")
            est, step = _checkpoint(baseline.splits[split], base_keys, run.splits[split], run_keys)
            result.checkpoint[split], result.checkpoint_step[split] = est, step
        results.append(result)
    return Comparison(
        baseline=baseline,
        runs=results,
        cfg=cfg,
        smoothed=smoothed,
        rising=rising_keys(base_curves, cfg.rise_tolerance),
        milestones=milestones(baseline, runs, cfg.at_steps) if cfg.at_steps else {},
    )


def _flops_per_step(run: RunCurves) -> float:
    curves = run.splits.get("train") or run.splits["val"]
    if curves.step[-1] <= 0:
        return 0.0
    return flops_per_step(curves.step, curves.flops)


def _check_comparable(base: RunCurves, run: RunCurves, result: RunResult, cfg: CompareConfig):
    if abs(result.flops_ratio - 1.0) > cfg.flops_tolerance:
        result.warnings.append(
            f"not FLOPs-matched: {result.flops_ratio:.3f}x the baseline's FLOPs per step "
            f"(savings factors compare FLOPs, step slopes compare steps)"
        )
    for split, nf in run.nonfinite.items():
        result.warnings.append(nf.text(split))
    if base.load and run.load and max(base.load, run.load) > LOAD_RATIO * min(base.load, run.load):
        result.warnings.append(
            f"trained under a machine load of {run.load:.2f} per core, the baseline under "
            f"{base.load:.2f}: its time savings measure the machine's load as much as the model"
        )
    base_last, run_last = _last_step(base), _last_step(run)
    if run_last < base_last:
        result.warnings.append(
            f"shorter than the baseline ({run_last} vs {base_last} steps): losses it does not "
            f"reach are bounds"
        )


def _last_step(run: RunCurves) -> int:
    return int(max(c.step[-1] for c in run.splits.values()))


def _sign(key: str) -> float:
    """Curves are compared as lower-is-better: higher-is-better values are negated."""
    return -1.0 if higher_is_better(key) else 1.0


def _compare_split(base_keys, run_keys, cfg: CompareConfig) -> dict[str, KeyResult]:
    out = {}
    for key, (b_step_N, b_flops_N, b_y_N, b_t_N) in base_keys.items():
        final = float(b_y_N[-1])
        if key not in run_keys:
            out[key] = KeyResult(final, Estimate(None, "none", f"the run logs no {key}"))
            continue
        r_step_M, r_flops_M, r_y_M, r_t_M = run_keys[key]
        sign = _sign(key)
        b_y_N, r_y_M = sign * b_y_N, sign * r_y_M
        if b_flops_N[-1] > 0 and r_flops_M[-1] > 0:
            savings = savings_factor(b_flops_N, b_y_N, r_flops_M, r_y_M, negated=sign < 0)
        else:
            savings = Estimate(None, "none", "no FLOPs logged")
        match = match_steps(b_step_N, b_y_N, r_step_M, r_y_M, fit_from=cfg.fit_from)
        result = KeyResult(final, savings, match)
        if np.all(np.isfinite(b_t_N)) and np.all(np.isfinite(r_t_M)) and b_t_N[-1] > 0:
            result.time_savings = savings_factor(
                b_t_N, b_y_N, r_t_M, r_y_M, unit="s", negated=sign < 0
            )
            result.time_match = match_steps(b_t_N, b_y_N, r_t_M, r_y_M, fit_from=cfg.fit_from)
        out[key] = result
    return out


def _checkpoint(
    base: SplitCurves, base_keys, run: SplitCurves, run_keys
) -> tuple[Estimate, int | None]:
    """The earliest run point at or below every final baseline loss, as % of baseline steps."""
    base_final = {k: _sign(k) * float(v[2][-1]) for k, v in base_keys.items()}
    aligned = {}
    for key, (_, _, y_M, _) in run_keys.items():
        full_M = np.full(run.step.shape, np.nan)
        full_M[np.searchsorted(run.step, run.curve(key)[0])] = _sign(key) * y_M
        aligned[key] = full_M
    i = checkpoint_point(run.step, aligned, base_final)
    base_last = float(base.step[-1])
    if i is None:
        pct = 100.0 * float(run.step[-1]) / base_last
        return Estimate(pct, "lower", "no logged point is at or below every final loss"), None
    return Estimate(100.0 * float(run.step[i]) / base_last), int(run.step[i])


def as_dict(comp: Comparison) -> dict[str, Any]:
    """The comparison as plain JSON-ready data."""
    base = comp.baseline
    finals = {
        split: {k: float(v[2][-1]) for k, v in keys.items()}
        for split, keys in comp.smoothed[base.name].items()
    }
    runs = []
    for r in comp.runs:
        splits = {}
        for split, keys in r.keys.items():
            splits[split] = {
                key: {
                    "savings_factor": kr.savings.as_dict(),
                    "step_slope": (
                        kr.match.slope if kr.match else Estimate(None, "none")
                    ).as_dict(),
                    "matched_steps": _pairs(kr.match),
                    "time_savings_factor": kr.time_savings.as_dict(),
                    "time_slope": (
                        kr.time_match.slope if kr.time_match else Estimate(None, "none")
                    ).as_dict(),
                    "matched_times": _pairs(kr.time_match),
                    "higher_is_better": higher_is_better(key),
                }
                for key, kr in keys.items()
            }
        checkpoint = {
            split: {"percent_of_baseline_steps": est.as_dict(), "step": r.checkpoint_step[split]}
            for split, est in r.checkpoint.items()
        }
        runs.append(
            {
                "name": r.run.name,
                "path": str(r.run.path),
                "last_step": _last_step(r.run),
                "flops_per_step": r.flops_per_step,
                "flops_ratio_to_baseline": r.flops_ratio,
                "machine_load_per_core": r.run.load,
                "warnings": r.warnings,
                "splits": splits,
                "checkpoint": checkpoint,
                "nonfinite": _nonfinite_dict(r.run),
            }
        )
    return {
        "baseline": {
            "name": base.name,
            "path": str(base.path),
            "last_step": _last_step(base),
            "flops_per_step": _flops_per_step(base),
            "final_loss_smoothed": finals,
            "rising": {
                split: {k: {"best": b, "best_step": st} for k, (b, st) in keys.items()}
                for split, keys in comp.rising.items()
            },
            "machine_load_per_core": base.load,
            "nonfinite": _nonfinite_dict(base),
        },
        "config": to_dict(comp.cfg),
        "runs": runs,
        "milestones": comp.milestones,
    }


def _nonfinite_dict(run: RunCurves) -> dict[str, Any]:
    return {
        split: {
            "first_step": nf.first_step,
            "rows": nf.rows,
            "keys": list(nf.keys),
            "last_finite_step": nf.last_finite_step,
        }
        for split, nf in run.nonfinite.items()
    }


def _pairs(match: StepMatch | None) -> list[dict[str, Any]]:
    if match is None:
        return []
    return [
        {"baseline_step": float(d), "run_step": None if np.isnan(s) else float(s), "kind": k}
        for d, s, k in zip(match.base_step, match.run_step, match.kind, strict=True)
    ]


def markdown(comp: Comparison) -> str:
    """Markdown tables: per split, one row per run, savings factor and slope per loss key."""
    base = comp.baseline
    rising_all = comp.rising
    lines = [
        f"# Comparison against `{base.name}`",
        "",
        "Savings factor: baseline total FLOPs / FLOPs at which the run first reaches the "
        "baseline's final loss (`> x`: lower bound, `< x`: upper bound, the run never reaches it). "
        "Slope s: least-squares slope through the origin of the run step matching each baseline "
        f"step, fitted over baseline steps >= {comp.cfg.fit_from:g} x its last step "
        "(s = 0.5: the run needs half the steps). x% checkpoint: the earliest logged run step at "
        "or below every final baseline loss of the split, as % of the baseline's steps. "
        f"Smoothing: EMA {comp.cfg.smoothing:g} (training), {comp.cfg.val_smoothing:g} "
        "(validation, eval). Time savings: the same factor on wall-clock training time "
        "(`elapsed_s`); 1 / factor is the share of the baseline's time. `clip_sf` and `cider` are "
        "higher-is-better (reaching a level means being at or above it).",
        "",
    ]
    for split in SPLITS:
        keys = list(comp.smoothed[base.name].get(split, {}))
        if not keys:
            continue
        names = [short_key(k) for k in keys]
        timed = any(
            kr.time_match is not None for r in comp.runs for kr in r.keys.get(split, {}).values()
        )
        head = (
            ["run", "FLOPs/step"]
            + [f"savings {n}" for n in names]
            + [f"slope {n}" for n in names]
            + ([f"time savings {n}" for n in names] if timed else [])
            + ["x% checkpoint"]
        )
        lines += [f"## {SPLIT_TITLES[split]}", "", md_row(head), md_row(["---"] * len(head))]
        finals = comp.smoothed[base.name][split]
        rising = rising_all.get(split, {})
        lines.append(
            md_row(
                [f"{base.name} (baseline)", "1.00x"]
                + [
                    f"final {finals[k][2][-1]:.4f}{_rose(rising.get(k))}{_diverged(base, split)}"
                    for k in keys
                ]  # fmt: skip
                + ["1.00"] * len(keys)
                + (["1.00x"] * len(keys) if timed else [])
                + ["100%"]
            )
        )
        for r in comp.runs:
            res = r.keys.get(split)
            if res is None:
                continue
            cells = [r.run.name, f"{r.flops_ratio:.2f}x"]
            cells += [res[k].savings.text(2, "x") for k in keys]
            cells += [res[k].match.slope.text(3) if res[k].match else "n/a" for k in keys]
            if timed:
                cells += [res[k].time_savings.text(2, "x") for k in keys]
            cells.append(_checkpoint_text(r, split) + _diverged(r.run, split))
            lines.append(md_row(cells))
        lines.append("")
    if comp.milestones:
        lines += markdown_lines(comp.milestones, base.name)
    notes = [f"- `{base.name}` (baseline): {nf.text(s)}" for s, nf in base.nonfinite.items()]
    notes += [f"- `{r.run.name}`: {w}" for r in comp.runs for w in r.warnings]
    notes += [
        f"- `{base.name}` (baseline) {SPLIT_TITLES[split].lower()} {short_key(k)}: its value rose "
        f"from {best:.4f} (step {step}) to {comp.smoothed[base.name][split][k][2][-1]:.4f} at the "
        "end (overfitting?). A run reaches that final value on its way down, so this key's "
        "savings and slope measure the rise, not a saving: compare it at fixed steps instead."
        for split, keys in rising_all.items()
        for k, (best, step) in keys.items()
    ]
    notes += [
        f"- `{r.run.name}` {split} {k}: {kr.savings.note or kr.match.slope.note}"
        for r in comp.runs
        for split, keys in r.keys.items()
        for k, kr in keys.items()
        if kr.savings.kind != "exact" or (kr.match and kr.match.slope.kind != "exact")
    ]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


def rising_keys(
    base_curves: dict[str, dict[str, Curve]], tolerance: float
) -> dict[str, dict[str, tuple[float, int]]]:
    """split -> key -> (best value, its step) for the baseline's held-out curves (validation,
    eval; a training loss is as noisy as its batches) whose final value is worse than their
    best by more than ``tolerance`` (relative; ``compare.rise_tolerance``)."""
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for split, keys in base_curves.items():
        if split == "train":
            continue
        for key, (step_M, _, y_M, _) in keys.items():
            sign = _sign(key)
            if not np.isfinite(y_M).all():  # a diverged curve is flagged as such
                continue
            i = int(np.argmin(sign * y_M))
            best, final = float(y_M[i]), float(y_M[-1])
            if sign * (final - best) > tolerance * abs(best):
                out.setdefault(split, {})[key] = (best, int(round(float(step_M[i]))))
    return out


def _rose(rise: tuple[float, int] | None) -> str:
    return f" (best {rise[0]:.4f} at step {rise[1]})" if rise else ""


def _diverged(run: RunCurves, split: str) -> str:
    nf = run.nonfinite.get(split)
    return f" (non-finite from step {nf.first_step})" if nf else ""


def _checkpoint_text(r: RunResult, split: str) -> str:
    est, step = r.checkpoint[split], r.checkpoint_step[split]
    return f"{est.text(1, '%')} (step {step})" if step is not None else est.text(1, "%")


def compact_json(value: Any, indent: int = 0, width: int = 100) -> str:
    """JSON indented by two spaces, but any object or list that fits on one line of ``width``
    is written on it: a long study's matched-step lists take a line per point, not five."""
    flat = json.dumps(value)
    if not isinstance(value, dict | list) or not value or indent + len(flat) <= width:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, list) and not any(isinstance(v, dict | list) for v in value):
        lines = [pad]  # scalars: as many to a line as fit
        for v in map(json.dumps, value):
            if len(lines[-1]) > len(pad) and len(lines[-1]) + len(v) + 2 > width:
                lines.append(pad)
            lines[-1] += v + ", "
        return "[\n" + "\n".join(x.rstrip() for x in lines)[:-1] + "\n" + " " * indent + "]"
    if isinstance(value, list):
        items = [pad + compact_json(v, indent + 2, width) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    keys = json.loads(json.dumps(dict.fromkeys(value)))  # JSON's own key strings (1 -> "1")
    items = [f"{pad}{json.dumps(k)}: {compact_json(v, indent + 2, width)}"
             for k, v in zip(keys, value.values(), strict=True)]  # fmt: skip
    return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"


def write_report(comp: Comparison, out: Path) -> list[Path]:
    """Write ``compare.md``, ``compare.json`` and (when enabled) the PNG plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "compare.md", out / "compare.json"
    md.write_text(markdown(comp))
    js.write_text(compact_json(as_dict(comp)) + "\n")
    written = [md, js]
    if comp.cfg.plots:
        from sparsefusion.compare.plots import plot_loss_vs_flops, plot_step_matching

        for split in SPLITS:
            if split in comp.smoothed[comp.baseline.name]:
                written.append(plot_loss_vs_flops(comp, split, out / f"loss_vs_flops_{split}.png"))
                written.append(plot_step_matching(comp, split, out / f"step_matching_{split}.png"))
                if _timed(comp, split):
                    lt, tm = out / f"loss_vs_time_{split}.png", out / f"time_matching_{split}.png"
                    written.append(plot_loss_vs_flops(comp, split, lt, time=True))
                    written.append(plot_step_matching(comp, split, tm, time=True))
    return written


def _timed(comp: Comparison, split: str) -> bool:
    results = [kr for r in comp.runs for kr in r.keys.get(split, {}).values()]
    return any(kr.time_match is not None for kr in results)


def run_compare(baseline: str | Path, runs: list[str | Path], out: Path, cfg: CompareConfig):
    """Load the runs, compare, write the report; returns the comparison and the files written."""
    names: set[str] = set()
    loaded = []
    for path in [baseline, *runs]:
        curves = load_run(path, eval_size=cfg.eval_size)
        if curves.name in names:
            curves.name = str(path)
        names.add(curves.name)
        loaded.append(curves)
    comp = compare_runs(loaded[0], loaded[1:], cfg)
    return comp, write_report(comp, out)
