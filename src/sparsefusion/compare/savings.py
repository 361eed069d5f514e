"""The papers' training-curve ratios as pure functions on arrays.

- FLOPs savings factor (MoMa, arXiv:2407.21770, section 4.1): the baseline's total FLOPs over the
  FLOPs at which a run first reaches the baseline's final loss.
- Step matching (MoT, arXiv:2411.04996, section 3.2): for each baseline step, the step at which a
  run first reaches that step's baseline loss, and the slope of a line through those pairs.
- The "x% checkpoint": the earliest logged point of a run that is at or below every final
  baseline loss (MoT's 55.8% headline).

Choices the papers leave open (spec section 9, item 12), fixed here:

- Smoothing: an exponential moving average over logged points with bias correction (as in Adam
  and TensorBoard), ``m_i = a * m_{i-1} + (1 - a) * y_i``, reported value ``m_i / (1 - a^(i+1))``,
  applied with the same weights to the loss and to its x (step, FLOPs). Each smoothed point is
  then a weighted mean of logged points and lies on the curve wherever the curve is locally
  straight, so smoothing adds no lag (smoothing the loss alone would lag by ``a / (1 - a)``
  points and bias the ratios towards 1). The baseline's "final loss" is its last smoothed point
  and its "total FLOPs" the smoothed FLOPs of that point. ``a = 0`` turns smoothing off (the
  default for validation curves, which are measured on a fixed held-out set and logged rarely).
- Crossing: the first logged point at or below the level, linearly interpolated (in x) with the
  point before it. A curve already below the level at its first point gives only a bound.
- Step-matching fit: least squares through the origin, ``s = sum(t_d * t_s) / sum(t_d^2)``, over
  the baseline steps in the last ``1 - fit_from`` of the baseline (default: the second half), where
  early warm-up transients do not dominate.

A run that never reaches a level is reported as a bound (``Estimate.kind``), never as a number
that was not measured.

Legend: N = logged points of the baseline curve, M = logged points of the run curve.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

EstimateKind = Literal["exact", "lower", "upper", "none"]


@dataclass(kw_only=True)
class CompareConfig:
    """How curves are compared (``sparsefusion compare ... key=value``).

    Attributes:
        smoothing: EMA weight of the past for training-loss curves, in [0, 1) (0: off).
        val_smoothing: the same for validation-loss curves.
        fit_from: the step-matching fit uses baseline steps >= fit_from * last baseline step.
        flops_tolerance: warn when a run's FLOPs per step differ from the baseline's by more than
            this relative amount (the savings factor assumes FLOPs-matched runs).
        plots: write PNG plots.
        eval_size: which ``eval.jsonl`` rows form the ``eval`` split: ``small`` (the in-training
            evaluation), ``full`` (``sparsefusion eval``) or ``auto`` (small if any, else full).
        at_steps: steps at which the report also tabulates every run's validation and eval
            values beside the baseline's, with the step from which each run stays ahead
            (:mod:`sparsefusion.compare.milestones`; empty: no such tables).
        rise_tolerance: flag a baseline validation or eval curve whose final value is worse
            than its best by more than this relative amount (a loss that rose: overfitting).
            A run then "reaches" the final value on its way down, so that key's savings and
            slope measure the rise, not a saving; the report says so beside them.
    """

    smoothing: float = 0.6
    val_smoothing: float = 0.0
    fit_from: float = 0.5
    flops_tolerance: float = 0.03
    plots: bool = True
    eval_size: str = "auto"
    at_steps: list[int] = field(default_factory=list)
    rise_tolerance: float = 0.01

    def __post_init__(self) -> None:
        if any(step <= 0 for step in self.at_steps) or len(set(self.at_steps)) != len(
            self.at_steps
        ):
            raise ValueError(f"compare.at_steps must be distinct steps > 0, got {self.at_steps}")
        self.at_steps = sorted(self.at_steps)
        if self.eval_size not in ("auto", "small", "full"):
            raise ValueError(f"compare.eval_size must be auto, small or full, got {self.eval_size}")
        for name in ("smoothing", "val_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"compare.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.fit_from < 1.0:
            raise ValueError(f"compare.fit_from must be in [0, 1), got {self.fit_from}")
        if self.flops_tolerance < 0:
            raise ValueError(f"compare.flops_tolerance must be >= 0, got {self.flops_tolerance}")
        if self.rise_tolerance < 0:
            raise ValueError(f"compare.rise_tolerance must be >= 0, got {self.rise_tolerance}")


@dataclass(frozen=True)
class Estimate:
    """A measured quantity or a bound on it.

    Attributes:
        value: the number (None when nothing can be stated).
        kind: ``exact``; ``lower`` (the true value is >= value); ``upper`` (the true value is
            <= value); ``none`` (not measurable).
        note: why it is a bound, in words.
    """

    value: float | None
    kind: EstimateKind = "exact"
    note: str = ""

    def text(self, digits: int = 2, suffix: str = "") -> str:
        """``1.23x``, ``> 1.23x`` (lower bound), ``< 1.23x`` (upper bound) or ``n/a``."""
        if self.value is None or self.kind == "none":
            return "n/a"
        prefix = {"exact": "", "lower": "> ", "upper": "< "}[self.kind]
        return f"{prefix}{self.value:.{digits}f}{suffix}"

    def as_dict(self) -> dict[str, float | str | None]:
        return {"value": self.value, "kind": self.kind, "text": self.text(), "note": self.note}


@dataclass(frozen=True)
class Crossing:
    """Where a curve first reaches a level.

    Attributes:
        x: the interpolated x (None when never reached).
        kind: ``exact``; ``at_or_before`` (already at or below the level at the first point, so
            the crossing is at or before ``x``); ``never`` (not reached by the last point).
    """

    x: float | None
    kind: Literal["exact", "at_or_before", "never"]


def ema(y_M: np.ndarray, smoothing: float) -> np.ndarray:
    """Bias-corrected exponential moving average over logged points (``smoothing`` in [0, 1))."""
    y_M = np.asarray(y_M, dtype=np.float64)
    if smoothing == 0.0 or y_M.size == 0:
        return y_M.copy()
    out_M = np.empty_like(y_M)
    m = 0.0
    for i, y in enumerate(y_M):
        m = smoothing * m + (1.0 - smoothing) * y
        out_M[i] = m / (1.0 - smoothing ** (i + 1))
    return out_M


def first_crossing(x_M: np.ndarray, y_M: np.ndarray, level: float) -> Crossing:
    """The first x at which the curve ``(x_M, y_M)`` is at or below ``level``.

    Linear interpolation between the first point at or below the level and the point before it.
    """
    below = np.flatnonzero(np.asarray(y_M) <= level)
    if below.size == 0:
        return Crossing(None, "never")
    i = int(below[0])
    if i == 0:
        return Crossing(float(x_M[0]), "at_or_before")
    x0, x1, y0, y1 = float(x_M[i - 1]), float(x_M[i]), float(y_M[i - 1]), float(y_M[i])
    return Crossing(x0 + (level - y0) * (x1 - x0) / (y1 - y0), "exact")


def savings_factor(
    base_flops_N: np.ndarray,
    base_loss_N: np.ndarray,
    run_flops_M: np.ndarray,
    run_loss_M: np.ndarray,
    *,
    unit: str = "FLOPs",
    negated: bool = False,
) -> Estimate:
    """The baseline's total FLOPs over the FLOPs at which the run first reaches its final loss.

    ``negated``: the curves are a higher-is-better metric passed negated (notes then name the
    metric's own value and say "at or above").

    With elapsed seconds as x (``unit="s"``) this is the wall-clock savings factor (MoT,
    arXiv:2411.04996, Figure 19: 1 / factor is the share of the baseline's time).

    Curves are expected already smoothed. Bounds: a run below the level at its first point gives
    a lower bound (``total / first``); a run that never reaches it an upper bound
    (``total / last``: it would need more than its last logged FLOPs).
    """
    total, level = float(base_flops_N[-1]), float(base_loss_N[-1])
    cross = first_crossing(run_flops_M, run_loss_M, level)
    shown, what = (-level, "value") if negated else (level, "loss")
    if cross.kind == "never":
        last = float(run_flops_M[-1])
        note = f"never reaches the baseline's final {what} {shown:.4f} within {last:.3g} {unit}"
        return Estimate(total / last, "upper", note)
    if cross.x is None or cross.x <= 0:
        return Estimate(None, "none", f"crossing at zero {unit}")
    if cross.kind == "at_or_before":
        side = "above" if negated else "below"
        note = f"already at or {side} {shown:.4f} at its first logged point"
        return Estimate(total / cross.x, "lower", note)
    return Estimate(total / cross.x)


@dataclass(frozen=True)
class StepMatch:
    """Step matching of a run against a baseline.

    Attributes:
        base_step: baseline steps t_d (N).
        run_step: the matched run steps t_s (N; NaN where never reached).
        kind: per pair, ``exact``, ``at_or_before`` or ``never``.
        fit_mask: which pairs the slope fit uses (N).
        slope: the fitted slope ``s`` (or a bound).
    """

    base_step: np.ndarray
    run_step: np.ndarray
    kind: list[str]
    fit_mask: np.ndarray
    slope: Estimate


def match_steps(
    base_step_N: np.ndarray,
    base_loss_N: np.ndarray,
    run_step_M: np.ndarray,
    run_loss_M: np.ndarray,
    *,
    fit_from: float = 0.5,
) -> StepMatch:
    """For each baseline step, the run step first reaching its loss; then the fitted slope.

    Curves are expected already smoothed. See the module docstring for the fit.
    """
    base_step_N = np.asarray(base_step_N, dtype=np.float64)
    run_step_N = np.full(base_step_N.shape, np.nan)
    kinds: list[str] = []
    for i, level in enumerate(base_loss_N):
        cross = first_crossing(run_step_M, run_loss_M, float(level))
        kinds.append(cross.kind)
        if cross.x is not None:
            run_step_N[i] = cross.x
    fit_mask_N = base_step_N >= fit_from * base_step_N[-1]
    slope = fit_slope(base_step_N, run_step_N, kinds, fit_mask_N, float(run_step_M[-1]))
    return StepMatch(base_step_N, run_step_N, kinds, fit_mask_N, slope)


def fit_slope(
    base_step_N: np.ndarray,
    run_step_N: np.ndarray,
    kinds: list[str],
    fit_mask_N: np.ndarray,
    run_last_step: float,
) -> Estimate:
    """Least-squares slope through the origin of ``run_step`` against ``base_step``.

    The slope grows with every ``run_step``, so pairs the run never reached, set to the run's last
    step, make it a lower bound; pairs reached before the run's first logged point make it an
    upper bound; both together leave nothing to state.
    """
    idx = np.flatnonzero(fit_mask_N)
    never = [i for i in idx if kinds[i] == "never"]
    early = [i for i in idx if kinds[i] == "at_or_before"]
    t_d = base_step_N[idx]
    t_s = np.where(np.isnan(run_step_N[idx]), run_last_step, run_step_N[idx])
    denom = float(np.sum(t_d * t_d))
    if idx.size == 0 or denom == 0.0:
        return Estimate(None, "none", "no baseline steps in the fit range")
    value = float(np.sum(t_d * t_s) / denom)
    if never and early:
        return Estimate(None, "none", "some levels reached before the first log, others never")
    if never:
        note = f"{len(never)} of {idx.size} fitted baseline losses never reached by the run"
        return Estimate(value, "lower", note)
    if early:
        note = f"{len(early)} of {idx.size} fitted baseline losses reached before its first log"
        return Estimate(value, "upper", note)
    return Estimate(value)


def checkpoint_point(
    run_step_M: np.ndarray, run_losses: dict[str, np.ndarray], base_final: dict[str, float]
) -> int | None:
    """Index of the earliest run point at or below every final baseline loss (None if none).

    Args:
        run_step_M: the run's logged steps (shared by all ``run_losses`` curves).
        run_losses: loss curves of the run, key -> (M,), NaN where a key was not logged.
        base_final: the baseline's final loss per key; only keys in both are checked.
    """
    keys = [k for k in base_final if k in run_losses]
    if not keys:
        return None
    ok_M = np.ones(len(run_step_M), dtype=bool)
    for key in keys:
        ok_M &= np.asarray(run_losses[key]) <= base_final[key]  # NaN compares False
    hits = np.flatnonzero(ok_M)
    return int(hits[0]) if hits.size else None


def flops_per_step(step_M: np.ndarray, flops_M: np.ndarray) -> float:
    """Average training FLOPs per optimizer step (cumulative FLOPs over steps at the last point)."""
    return float(flops_M[-1]) / float(step_M[-1])
