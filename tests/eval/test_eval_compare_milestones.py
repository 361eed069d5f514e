"""`compare.at_steps`: the runs beside the baseline at chosen steps, and when each gets ahead."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparsefusion.compare.milestones import Overtake, overtakes, value_at
from sparsefusion.compare.report import run_compare
from sparsefusion.compare.savings import CompareConfig
from sparsefusion.config import ConfigError, from_dict

STEPS = np.array([100, 200, 300, 400])


def test_value_at_reads_the_last_row_at_or_before():
    y = np.array([4.0, 3.0, 2.5, 2.0])
    assert value_at(STEPS, y, 300).value == 2.5 and value_at(STEPS, y, 300).step == 300
    assert value_at(STEPS, y, 350).step == 300  # not logged there: the row before
    assert value_at(STEPS, y, 99).value is None


@pytest.mark.parametrize(
    "run, higher, expected",
    [
        ([4.1, 3.1, 2.4, 1.9], False, Overtake(300, "from", 400)),
        ([3.9, 2.9, 2.4, 1.9], False, Overtake(100, "from_start", 400)),
        ([3.9, 3.1, 2.4, 1.9], False, Overtake(300, "from", 400)),  # ahead, behind, ahead again
        ([3.9, 2.9, 2.4, 2.0], False, Overtake(None, "not_yet", 400)),  # a tie is not ahead
        ([4.1, 3.1, 2.6, 2.1], True, Overtake(100, "from_start", 400)),  # higher is better
    ],
)
def test_overtakes(run, higher, expected):
    base = np.array([4.0, 3.0, 2.5, 2.0])
    assert overtakes(STEPS, base, STEPS, np.array(run), higher_better=higher) == expected


def test_overtakes_compares_only_shared_steps():
    base = np.array([4.0, 3.0, 2.5, 2.0])
    # the run logged 100, 250, 300: only 100 and 300 are shared (behind at 100, ahead at 300)
    run_steps, run = np.array([100, 250, 300]), np.array([4.5, 1.0, 2.4])
    assert overtakes(STEPS, base, run_steps, run) == Overtake(300, "from", 300, partial=True)
    assert Overtake(300, "from", 300, partial=True).text() == "from 300 (so far: to 300)"
    assert overtakes(STEPS, base, np.array([150]), np.array([1.0])).kind == "none"


def _run(root: Path, name: str, offset) -> Path:
    """Validation rows every 100 steps: dense's 1/sqrt(step) curve plus ``offset(step)``."""
    run = root / name
    run.mkdir()
    rows = []
    for step in range(100, 1001, 100):
        base = {"loss/text": 2 + step**-0.5, "loss/image": 1 + step**-0.5}
        image = base["loss/image"] + offset(step)
        row = {"step": step, "flops": step * 1e9, "split": "val", "loss/text": base["loss/text"],
               "loss/image": image, "loss": (base["loss/text"] + image) / 2}  # fmt: skip
        rows += [{**row, "split": "train"}, row]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_report_tables_at_steps_and_when_each_run_gets_ahead(tmp_path: Path):
    base = _run(tmp_path, "dense", lambda s: 0.0)
    late = _run(tmp_path, "late", lambda s: 0.001 * (600 - s))  # behind until 600, ahead after
    cfg = CompareConfig(smoothing=0.0, plots=False, at_steps=[1000, 250, 500])
    _, files = run_compare(base, [late], tmp_path / "out", cfg)
    md = files[0].read_text()
    for step in (250, 500, 1000):
        assert f"## Validation at step {step}" in md
    # 250 is not logged: the row of step 200, and the table says so
    assert f"| {1 + 200**-0.5:.4f} (step 200) |" in md
    image_at_500 = 1 + 500**-0.5
    assert f"| {image_at_500 + 0.1:.4f} (+0.1000) |" in md  # the run beside the baseline
    data = json.loads(files[1].read_text())["milestones"]["val"]
    assert list(data["at"]) == ["250", "500", "1000"]  # sorted
    read = data["at"]["500"]["late"]["loss/image"]
    assert read["step"] == 500 and read["value"] == pytest.approx(image_at_500 + 0.1)
    ahead = data["overtakes"]["late"]
    assert ahead["loss/image"]["step"] == 700 and ahead["loss/image"]["kind"] == "from"
    assert ahead["loss/text"]["kind"] == "not_yet"  # equal text losses: never ahead
    assert "| late | from 700 | from 700 | not by 1000 |" in md.replace("overall", "")


@pytest.mark.parametrize("steps", [[0, 100], [100, 100], [-5]])
def test_bad_at_steps_name_the_key(steps):
    with pytest.raises((ConfigError, ValueError), match="at_steps"):
        from_dict(CompareConfig, {"at_steps": steps}, where="compare")


def test_a_step_a_run_has_not_reached_shows_no_value(tmp_path: Path):
    """An unfinished run (stopped at 600 of 1000): its last value is not its value at 1000."""
    base = _run(tmp_path, "dense", lambda s: 0.0)
    short = _run(tmp_path, "short", lambda s: -0.01)
    path = short / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 600))
    cfg = CompareConfig(smoothing=0.0, plots=False, at_steps=[600, 1000])
    _, files = run_compare(base, [short], tmp_path / "out", cfg)
    md = files[0].read_text()
    at_1000 = md.split("## Validation at step 1000")[1].split("##")[0]
    assert "| short | not reached (last 600) |" in at_1000
    assert "(step 600)" not in at_1000
    data = json.loads(files[1].read_text())["milestones"]["val"]
    assert data["at"]["1000"]["short"]["loss"] == {"step": None, "value": None, "last_step": 600}
    assert data["at"]["600"]["short"]["loss"]["value"] == pytest.approx(
        data["at"]["600"]["dense"]["loss"]["value"] - 0.005
    )


def test_a_step_where_nothing_was_logged_gets_no_table(tmp_path: Path):
    base = _run(tmp_path, "dense", lambda s: 0.0)
    other = _run(tmp_path, "other", lambda s: -0.01)
    cfg = CompareConfig(smoothing=0.0, plots=False, at_steps=[50, 500])
    _, files = run_compare(base, [other], tmp_path / "out", cfg)
    md = files[0].read_text()
    assert "## Validation at step 500" in md and "## Validation at step 50\n" not in md
