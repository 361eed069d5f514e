"""`sparsefusion compare` on synthetic run folders: report files, bounds, warnings and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparsefusion.cli.main import main
from sparsefusion.compare.curves import load_run
from sparsefusion.compare.report import compare_runs, markdown, run_compare
from sparsefusion.compare.savings import CompareConfig


def _write_run(
    root: Path,
    name: str,
    *,
    speed: float = 1.0,
    steps: int = 400,
    flops_per_step: float = 1e9,
    modalities: tuple[str, ...] = ("text", "image"),
    image_speed: float | None = None,
) -> Path:
    """A run folder whose losses are a power law in ``speed * step`` (per modality)."""
    run = root / name
    run.mkdir(parents=True)
    rows = []
    for step in range(5, steps + 1, 5):
        row = {"step": step, "tokens": step * 100, "flops": step * flops_per_step}
        speeds = {"text": speed, "image": image_speed or speed}
        for m in modalities:
            row[f"loss/{m}"] = 2.0 + (3.0 if m == "text" else 4.0) * (speeds[m] * step) ** -0.4
        row["loss"] = float(np.mean([row[f"loss/{m}"] for m in modalities]))
        rows.append(row)
        if step % 50 == 0:
            rows.append({**row, "split": "val", "loss": row["loss"] + 0.1})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _cfg(**kw) -> CompareConfig:
    return CompareConfig(smoothing=0.0, plots=False, **kw)


def test_per_modality_savings_and_checkpoint(tmp_path: Path):
    base = _write_run(tmp_path, "dense")
    run = _write_run(tmp_path, "mot", speed=2.0, image_speed=4.0)
    comp = compare_runs(load_run(base), [load_run(run)], _cfg())
    res = comp.runs[0].keys["train"]
    assert res["loss/text"].savings.value == pytest.approx(2.0, rel=1e-6)
    assert res["loss/image"].savings.value == pytest.approx(4.0, rel=1e-6)
    assert res["loss/text"].match.slope.value == pytest.approx(0.5, rel=5e-3)
    assert res["loss/image"].match.slope.value == pytest.approx(0.25, rel=2e-2)
    assert 2.0 < res["loss"].savings.value < 4.0
    # x% checkpoint: text is the slower modality, it reaches the final baseline loss at 50%
    assert comp.runs[0].checkpoint_step["train"] == 200
    assert comp.runs[0].checkpoint["train"].value == pytest.approx(50.0)
    assert comp.runs[0].checkpoint_step["val"] == 200
    assert comp.runs[0].warnings == []


def test_missing_modality_and_flops_mismatch_are_reported(tmp_path: Path):
    base = _write_run(tmp_path, "dense")
    text_only = _write_run(tmp_path, "textonly", speed=2.0, modalities=("text",))
    costly = _write_run(tmp_path, "costly", speed=2.0, flops_per_step=1.5e9)
    comp = compare_runs(load_run(base), [load_run(text_only), load_run(costly)], _cfg())
    image = comp.runs[0].keys["train"]["loss/image"]
    assert image.savings.kind == "none" and image.match is None
    assert comp.runs[0].keys["train"]["loss/text"].savings.value == pytest.approx(2.0, rel=1e-6)
    assert any("not FLOPs-matched" in w for w in comp.runs[1].warnings)
    assert comp.runs[1].keys["train"]["loss"].savings.value == pytest.approx(2.0 / 1.5, rel=1e-6)
    text = markdown(comp)
    assert "n/a" in text and "not FLOPs-matched" in text


def test_shorter_run_never_reaching_is_a_bound_with_a_warning(tmp_path: Path):
    base = _write_run(tmp_path, "dense")
    short = _write_run(tmp_path, "short", speed=1.0, steps=200)
    comp = compare_runs(load_run(base), [load_run(short)], _cfg())
    est = comp.runs[0].keys["train"]["loss"].savings
    assert est.kind == "upper" and est.text(2, "x") == "< 2.00x"
    assert any("shorter than the baseline" in w for w in comp.runs[0].warnings)
    assert comp.runs[0].checkpoint["train"].kind == "lower"
    assert "< 2.00x" in markdown(comp)


def test_report_files_and_cli(tmp_path: Path, capsys):
    base = _write_run(tmp_path, "dense")
    _write_run(tmp_path, "mot", speed=2.0)
    _write_run(tmp_path, "slow", speed=0.8, modalities=("text",))
    out = tmp_path / "report"
    argv = ["compare", str(base), str(tmp_path / "mot"), str(tmp_path / "slow"), "--out", str(out)]
    assert main([*argv, "smoothing=0.3"]) == 0
    printed = capsys.readouterr().out
    assert "Training loss" in printed and "mot" in printed
    for name in ("compare.md", "compare.json", "loss_vs_flops_train.png", "step_matching_val.png"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "compare.json").read_text())
    assert data["baseline"]["name"] == "dense" and data["config"]["smoothing"] == 0.3
    mot, slow = data["runs"]
    assert mot["splits"]["train"]["loss"]["savings_factor"]["value"] == pytest.approx(2.0, rel=0.05)
    assert slow["splits"]["train"]["loss/text"]["savings_factor"]["kind"] == "upper"
    assert slow["splits"]["train"]["loss/image"]["savings_factor"]["text"] == "n/a"


def test_cli_compare_errors_name_the_file_or_key(tmp_path: Path, capsys):
    base = _write_run(tmp_path, "dense")
    assert main(["compare", str(base), str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    _write_run(tmp_path, "mot", speed=2.0)
    assert main(["compare", str(base), str(tmp_path / "mot"), "smoothin=0.2"]) == 2
    assert "did you mean 'smoothing'" in capsys.readouterr().err


def test_bad_metrics_files_give_errors_naming_the_file(tmp_path: Path):
    run = _write_run(tmp_path, "dense")
    path = run / "metrics.jsonl"
    good = path.read_text()
    lines = good.splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # truncated mid-row by a crash
    with pytest.raises(ValueError, match=r"metrics.jsonl:4: malformed"):
        load_run(run)
    path.write_text(good.replace('"step": 15,', '"step": "x",', 1))
    with pytest.raises(ValueError, match=r"metrics.jsonl: row 3 has no numeric 'step'"):
        load_run(run)
    path.write_text(good.replace('"flops": 10000000000.0,', '"flops": 1.0,', 1))
    with pytest.raises(ValueError, match=r"metrics.jsonl: train 'flops' must be positive"):
        load_run(run)
    path.write_text("")
    with pytest.raises(ValueError, match=r"dense/metrics.jsonl: the metrics file is empty"):
        load_run(run)
    path.write_text(json.dumps({"step": 1, "flops": 10, "lr": 0.1}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: train rows have no 'loss'"):
        load_run(run)
    with pytest.raises(ValueError, match=r"missing: no such run folder"):
        run_compare(tmp_path / "missing", [run], tmp_path / "o", _cfg())
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=r"empty_dir/metrics.jsonl: no metrics file"):
        load_run(tmp_path / "empty_dir")


def test_duplicate_steps_keep_the_later_row(tmp_path: Path):
    run = _write_run(tmp_path, "dense", steps=20)
    path = run / "metrics.jsonl"
    path.write_text(path.read_text() + json.dumps({"step": 10, "flops": 1e10, "loss": 0.5}) + "\n")
    curves = load_run(run).splits["train"]
    assert list(curves.step) == [5, 10, 15, 20]
    assert curves.losses["loss"][1] == 0.5 and np.isnan(curves.losses["loss/text"][1])


def test_compare_json_is_the_same_json_with_short_structures_on_one_line():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from sparsefusion.compare.report import compact_json

    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    keys = st.text(max_size=8) | st.integers()
    tree = st.recursive(scalars, lambda c: st.lists(c, max_size=30) | st.dictionaries(keys, c),
                        max_leaves=60)  # fmt: skip

    @settings(max_examples=200, deadline=None)
    @given(tree)
    def same(value):
        assert json.loads(compact_json(value)) == json.loads(json.dumps(value))

    same()
    points = {"matched_steps": [{"baseline_step": 20.0, "run_step": 14.1, "kind": "exact"}] * 3,
              "steps": list(range(100))}  # fmt: skip
    lines = compact_json(points).splitlines()
    assert lines[2] == '    {"baseline_step": 20.0, "run_step": 14.1, "kind": "exact"},'
    assert len(lines) == 14 and max(map(len, lines)) <= 100  # 100 steps on 4 lines, not 100


def test_a_baseline_validation_loss_that_rose_is_flagged_not_read_as_savings(tmp_path: Path):
    """Overfitting: the baseline's validation image loss falls, then rises by 10%. A run that
    passes that final value on its way down gets a large 'savings factor' which means nothing;
    the report marks the baseline's cell and says why in the notes; a flat curve is not marked."""
    base = _write_run(tmp_path, "dense")
    run = _write_run(tmp_path, "mot", speed=1.2)
    path = base / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:
        if r.get("split") == "val" and r["step"] > 200:  # rises linearly after step 200
            r["loss/image"] *= 1.0 + 0.10 * (r["step"] - 200) / 200
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    comp = compare_runs(load_run(base), [load_run(run)], _cfg())
    md = markdown(comp)
    val_image = [x for x in md.splitlines() if "image: its value rose from" in x]
    assert len(val_image) == 1 and "validation loss image" in val_image[0], md
    assert "(step 200)" in val_image[0]
    assert md.count("its value rose") == 1  # the overall and text curves, and training: not
    rising = json.loads(compact_json_of(comp))["baseline"]["rising"]
    assert list(rising) == ["val"] and list(rising["val"]) == ["loss/image"]
    assert rising["val"]["loss/image"]["best_step"] == 200
    calm = compare_runs(load_run(base), [load_run(run)], _cfg(rise_tolerance=0.2))
    assert "its value rose" not in markdown(calm)


def compact_json_of(comp) -> str:
    from sparsefusion.compare.report import as_dict, compact_json

    return compact_json(as_dict(comp))
