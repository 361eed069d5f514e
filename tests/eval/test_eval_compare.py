"""The comparison math on synthetic curves with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from sparsefusion.compare.savings import (
    CompareConfig,
    checkpoint_point,
    ema,
    first_crossing,
    match_steps,
    savings_factor,
)


def _loss(step: np.ndarray) -> np.ndarray:
    """A power-law training curve: 2 + 3 * (step / 10)^-0.4."""
    return 2.0 + 3.0 * (np.asarray(step, dtype=np.float64) / 10.0) ** -0.4


STEPS = np.arange(10, 1001, 10, dtype=np.float64)
FLOPS_PER_STEP = 1e9


def test_ema_is_identity_at_zero_and_debiased():
    y = np.array([3.0, 1.0, 2.0])
    assert np.array_equal(ema(y, 0.0), y)
    assert np.allclose(ema(np.full(5, 4.0), 0.9), 4.0)  # bias correction: no pull towards 0
    assert ema(y, 0.5)[1] == pytest.approx((0.25 * 3.0 + 0.5 * 1.0) / 0.75)


def test_first_crossing_interpolates_and_bounds():
    x, y = np.array([1.0, 2.0, 3.0]), np.array([5.0, 3.0, 1.0])
    assert first_crossing(x, y, 2.0).x == pytest.approx(2.5)
    assert first_crossing(x, y, 2.0).kind == "exact"
    assert first_crossing(x, y, 6.0).kind == "at_or_before"
    assert first_crossing(x, y, 0.5).kind == "never" and first_crossing(x, y, 0.5).x is None
    # the first crossing counts, not a later one after a bump
    assert first_crossing(np.arange(4.0), np.array([5.0, 2.0, 4.0, 1.0]), 3.0).x == pytest.approx(
        2.0 / 3.0
    )


def test_curve_compressed_2x_gives_savings_2_and_slope_half():
    base_y, run_y = _loss(STEPS), _loss(2.0 * STEPS)  # the run is the baseline, twice as fast
    flops = STEPS * FLOPS_PER_STEP
    est = savings_factor(flops, base_y, flops, run_y)
    assert est.kind == "exact" and est.value == pytest.approx(2.0, rel=1e-9)
    match = match_steps(STEPS, base_y, STEPS, run_y, fit_from=0.5)
    assert match.slope.kind == "exact"
    assert match.slope.value == pytest.approx(0.5, rel=2e-3)
    assert match.fit_mask.sum() == 51  # steps 500..1000


def test_compressed_curve_under_noise_and_default_smoothing():
    rng = np.random.default_rng(0)
    cfg = CompareConfig()
    noise = lambda: rng.normal(0.0, 0.005, STEPS.shape)  # noqa: E731
    base_y = ema(_loss(STEPS) + noise(), cfg.smoothing)
    run_y = ema(_loss(2.0 * STEPS) + noise(), cfg.smoothing)
    # x is smoothed with the same weights (no lag), as the report does
    steps = ema(STEPS, cfg.smoothing)
    flops = steps * FLOPS_PER_STEP
    assert savings_factor(flops, base_y, flops, run_y).value == pytest.approx(2.0, rel=0.05)
    slope = match_steps(steps, base_y, steps, run_y).slope
    assert slope.value == pytest.approx(0.5, rel=0.05)


def test_slower_run_gives_savings_below_one_and_slope_above_one():
    base_y, run_y = _loss(STEPS), _loss(STEPS / 1.25)
    flops = STEPS * FLOPS_PER_STEP
    est = savings_factor(flops, base_y, flops, run_y)
    assert est.kind == "upper" and est.value == pytest.approx(1.0)  # never reaches it: < 1.0x
    assert est.text(2, "x") == "< 1.00x"
    slope = match_steps(STEPS, base_y, STEPS, run_y).slope
    assert slope.kind == "lower"
    assert 1.0 <= slope.value < 1.25


def test_run_that_never_reaches_is_a_bound_not_a_number():
    base_y, run_y = _loss(STEPS), _loss(STEPS) + 0.5
    flops = STEPS * FLOPS_PER_STEP
    est = savings_factor(flops, base_y, flops, run_y)
    assert est.kind == "upper" and "never" in est.note
    assert est.text() == "< 1.00"
    match = match_steps(STEPS, base_y, STEPS, run_y)
    assert np.isnan(match.run_step[match.fit_mask]).all()
    assert match.slope.kind == "lower"


def test_unequal_lengths():
    # 2x faster but trained only to step 600: it still reaches the baseline's final loss at 500
    short = STEPS[STEPS <= 600]
    flops = STEPS * FLOPS_PER_STEP
    est = savings_factor(flops, _loss(STEPS), short * FLOPS_PER_STEP, _loss(2.0 * short))
    assert est.kind == "exact" and est.value == pytest.approx(2.0, rel=1e-9)
    # stopped at step 400 (before reaching it): only a bound, total / last = 1000 / 400
    short = STEPS[STEPS <= 400]
    est = savings_factor(flops, _loss(STEPS), short * FLOPS_PER_STEP, _loss(2.0 * short))
    assert est.kind == "upper" and est.value == pytest.approx(2.5)
    # a longer run than the baseline, equally fast: 1x, slope 1
    long = np.arange(10, 3001, 10, dtype=np.float64)
    est = savings_factor(flops, _loss(STEPS), long * FLOPS_PER_STEP, _loss(long))
    assert est.value == pytest.approx(1.0)
    assert match_steps(STEPS, _loss(STEPS), long, _loss(long)).slope.value == pytest.approx(1.0)


def test_run_better_from_its_first_point_is_a_lower_bound():
    flops = STEPS * FLOPS_PER_STEP
    est = savings_factor(flops, _loss(STEPS), flops, _loss(STEPS) - 10.0)
    assert est.kind == "lower" and est.value == pytest.approx(100.0)
    assert est.text(1, "x") == "> 100.0x"


def test_checkpoint_point_needs_every_key():
    steps = np.array([10.0, 20.0, 30.0, 40.0])
    losses = {
        "loss": np.array([3.0, 2.0, 1.5, 1.0]),
        "loss/text": np.array([3.0, 2.0, 2.5, 1.0]),
        "loss/image": np.array([3.0, np.nan, 1.0, 1.0]),
    }
    final = {"loss": 2.0, "loss/text": 2.0, "loss/image": 1.5}
    assert checkpoint_point(steps, losses, final) == 3  # text bounces above at 30, image NaN at 20
    assert checkpoint_point(steps, {"loss": losses["loss"]}, final) == 1  # missing keys skipped
    assert checkpoint_point(steps, losses, {"loss": 0.5}) is None


@pytest.mark.parametrize(
    "key, value", [("smoothing", 1.0), ("val_smoothing", -0.1), ("fit_from", 1.0)]
)
def test_compare_config_validation_names_the_key(key: str, value: float):
    with pytest.raises(ValueError, match=f"compare.{key}"):
        CompareConfig(**{key: value})
