"""`compare` on wall-clock time, on eval metrics (both directions), from step 0, and with NaNs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sparsefusion.compare.curves import load_run
from sparsefusion.compare.report import as_dict, compare_runs, markdown, run_compare
from sparsefusion.compare.savings import CompareConfig


def _loss(x):
    return 2.0 + 3.0 * (np.asarray(x, dtype=np.float64) / 10.0 + 1.0) ** -0.4


def _write(
    root: Path,
    name: str,
    *,
    speed=1.0,
    sec_per_step=1.0,
    start=5,
    nan_from=None,
    eval_rows=None,
    load=None,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    rows = []
    for step in range(start, 401, 5):
        loss = float(_loss(speed * step))
        if nan_from is not None and step >= nan_from:
            loss = math.nan
        rows.append(
            {
                "step": step,
                "flops": step * 1e9,
                "loss": loss,
                "loss/text": loss,
                "elapsed_s": step * sec_per_step,
            }
            | ({} if load is None else {"load": load})
        )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if eval_rows:
        (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    return run


def _cfg(**kw):
    return CompareConfig(smoothing=0.0, plots=False, **kw)


def test_wall_clock_matching_known_answer(tmp_path):
    base = load_run(_write(tmp_path, "dense"))
    # half the steps to each loss, but each step takes 1.6x as long: 2 / 1.6 = 1.25x in time
    run = load_run(_write(tmp_path, "mot", speed=2.0, sec_per_step=1.6))
    comp = compare_runs(base, [run], _cfg())
    kr = comp.runs[0].keys["train"]["loss"]
    assert kr.savings.value == pytest.approx(2.0, rel=1e-6)
    assert kr.match.slope.value == pytest.approx(0.5, rel=1e-3)
    assert kr.time_savings.kind == "exact"
    assert kr.time_savings.value == pytest.approx(1.25, rel=1e-6)
    assert kr.time_match.slope.value == pytest.approx(0.8, rel=1e-3)
    md = markdown(comp)
    assert "time savings overall" in md and "1.25x" in md
    js = as_dict(comp)["runs"][0]["splits"]["train"]["loss"]
    assert js["time_savings_factor"]["value"] == pytest.approx(1.25)
    assert js["time_slope"]["value"] == pytest.approx(0.8, rel=1e-3)


def test_no_elapsed_gives_no_time_column(tmp_path):
    a, b = _write(tmp_path, "a"), _write(tmp_path, "b", speed=2.0)
    for run in (a, b):
        p = run / "metrics.jsonl"
        rows = [json.loads(x) for x in p.read_text().splitlines()]
        p.write_text(
            "".join(
                json.dumps({k: v for k, v in r.items() if k != "elapsed_s"}) + "\n" for r in rows
            )
        )
    comp = compare_runs(load_run(a), [load_run(b)], _cfg())
    assert comp.runs[0].keys["train"]["loss"].time_match is None
    assert "time savings" not in markdown(comp)


def test_metrics_starting_at_step_zero_are_accepted(tmp_path):
    base = load_run(_write(tmp_path, "dense", start=0))
    run = load_run(_write(tmp_path, "mot", speed=2.0, start=0))
    assert base.splits["train"].step[0] == 0
    comp = compare_runs(base, [run], _cfg())
    assert comp.runs[0].keys["train"]["loss"].savings.value == pytest.approx(2.0, rel=1e-6)


def _eval_rows(speed: float, size: str = "small"):
    rows = []
    for step in range(0, 401, 20):
        q = (speed * step / 10.0 + 1.0) ** -0.5
        rows.append(
            {
                "step": step,
                "size": size,
                "flops": step * 1e9,
                "elapsed_s": float(step),
                "fid_sf": 10.0 * q,
                "clip_sf": 80.0 - 50.0 * q,
                "cider": 5.0 - 4.0 * q,
            }
        )
    return rows


def test_eval_metrics_step_matching_both_directions(tmp_path):
    base = load_run(_write(tmp_path, "dense", eval_rows=_eval_rows(1.0)))
    run = load_run(_write(tmp_path, "mot", speed=2.0, eval_rows=_eval_rows(2.0)))
    assert set(base.splits["eval"].losses) == {"fid_sf", "clip_sf", "cider"}
    comp = compare_runs(base, [run], _cfg())
    res = comp.runs[0].keys["eval"]
    for key in ("fid_sf", "clip_sf", "cider"):  # lower- and higher-is-better alike: 2x, s = 0.5
        assert res[key].savings.kind == "exact", key
        assert res[key].savings.value == pytest.approx(2.0, rel=1e-6), key
        assert res[key].match.slope.value == pytest.approx(0.5, rel=1e-2), key
    assert comp.runs[0].checkpoint["eval"].value == pytest.approx(50.0)
    # a worse run (slower) is < 1x on the higher-is-better metrics too, never > 1x
    slow = load_run(_write(tmp_path, "slow", speed=0.5, eval_rows=_eval_rows(0.5)))
    worse = compare_runs(base, [slow], _cfg()).runs[0].keys["eval"]
    for key in ("clip_sf", "cider", "fid_sf"):
        assert worse[key].savings.kind == "upper" and worse[key].savings.value <= 1.0
    assert "Evaluation metrics" in markdown(comp)


def test_eval_size_selects_rows(tmp_path):
    rows = _eval_rows(1.0, "small") + [dict(r, size="full", fid_sf=99.0) for r in _eval_rows(1.0)]
    run = _write(tmp_path, "dense", eval_rows=rows)
    assert load_run(run).splits["eval"].losses["fid_sf"].max() < 99.0  # auto: small
    assert np.all(load_run(run, eval_size="full").splits["eval"].losses["fid_sf"] == 99.0)
    with pytest.raises(ValueError, match="eval_size"):
        CompareConfig(eval_size="medium")


def test_diverged_baseline_is_reported_with_where_it_starts(tmp_path):
    base = load_run(_write(tmp_path, "dense", nan_from=200))
    nf = base.nonfinite["train"]
    assert nf.first_step == 200 and nf.rows == 41 and nf.last_finite_step == 195
    assert set(nf.keys) == {"loss", "loss/text"}
    run = load_run(_write(tmp_path, "mot", speed=2.0, nan_from=300))
    comp = compare_runs(base, [run], _cfg())
    md = markdown(comp)
    assert "non-finite from step 200" in md  # beside the baseline's final loss
    assert "`dense` (baseline): train: non-finite loss, loss/text from step 200" in md
    assert "`mot`: train: non-finite loss, loss/text from step 300" in md
    js = as_dict(comp)
    assert js["baseline"]["nonfinite"]["train"]["first_step"] == 200
    assert js["runs"][0]["nonfinite"]["train"]["rows"] == 21


def test_compare_writes_time_plots(tmp_path):
    a = _write(tmp_path, "dense", eval_rows=_eval_rows(1.0))
    b = _write(tmp_path, "mot", speed=2.0, sec_per_step=1.6, eval_rows=_eval_rows(2.0))
    _, files = run_compare(a, [b], tmp_path / "out", CompareConfig(smoothing=0.0))
    names = {f.name for f in files}
    for n in (
        "loss_vs_time_train.png",
        "time_matching_train.png",
        "step_matching_eval.png",
        "time_matching_eval.png",
    ):
        assert n in names, n


def test_higher_is_better_notes_name_the_metric_value():
    import numpy as np

    from sparsefusion.compare.savings import savings_factor

    base_x, base_y = np.array([1.0, 2.0]), -np.array([10.0, 20.0])  # clip_sf 10 -> 20, negated
    run_x, run_y = np.array([1.0, 2.0]), -np.array([25.0, 30.0])
    est = savings_factor(base_x, base_y, run_x, run_y, negated=True)
    assert "at or above 20.0000" in est.note
    never = savings_factor(base_x, base_y, run_x, -np.array([1.0, 2.0]), negated=True)
    assert "final value 20.0000" in never.note


@pytest.mark.parametrize(
    "loads, warned", [((1.0, 1.1), False), ((1.0, 1.6), True), ((1.8, 1.0), True)]
)
def test_time_savings_under_different_machine_loads_are_flagged(tmp_path, loads, warned):
    base = load_run(_write(tmp_path, "dense", load=loads[0]))
    run = load_run(_write(tmp_path, "mot", speed=2.0, load=loads[1]))
    assert (base.load, run.load) == pytest.approx(loads)
    comp = compare_runs(base, [run], _cfg())
    assert ("machine's load" in markdown(comp)) is warned
    js = as_dict(comp)
    assert js["runs"][0]["machine_load_per_core"] == pytest.approx(loads[1])
    assert js["baseline"]["machine_load_per_core"] == pytest.approx(loads[0])


def test_runs_without_load_rows_are_not_flagged(tmp_path):
    comp = compare_runs(
        load_run(_write(tmp_path, "a")), [load_run(_write(tmp_path, "b", load=3.0))], _cfg()
    )
    assert comp.baseline.load is None and "machine's load" not in markdown(comp)
