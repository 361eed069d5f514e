"""The prepared GPU check's CPU dry run completes and writes every JSON result (no rot); its
time budget stops a step that runs too long and still leaves every figure reached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path, tokenizer_cache):
    env = dict(os.environ, PYTHON=sys.executable, SF_TOKENIZER_CACHE=tokenizer_cache)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    for name in ("env", "bench_545m", "pytest_gpu", "pipeline", "pair", "bench_545m_more"):
        assert (tmp_path / f"{name}.json").is_file(), name
    steps = json.loads((tmp_path / "steps.json").read_text())
    assert len(steps) == 7 and all(s["status"] == "ok" for s in steps), steps
    pair = json.loads((tmp_path / "pair.json").read_text())
    assert pair["dense"]["steps"] == pair["mot"]["steps"] == 4
    assert pair["mot"]["tokens_per_s"] > 0
    pipeline = json.loads((tmp_path / "pipeline.json").read_text())
    assert set(pipeline) >= {"loader", "gpu", "breakdown", "trainer"}
    assert pipeline["loader"]["token_shards"]["tokens_per_s"] > 0
    assert set(pipeline["breakdown"]["dense/fused"]) >= {"data", "forward", "backward", "optimizer"}


def test_gpu_check_budget_cuts_steps_and_goes_on(tmp_path, tokenizer_cache):
    """A budget far too small: steps are stopped or skipped, the script still ends well, within
    the budget, and says what happened to each step."""
    env = dict(os.environ, PYTHON=sys.executable, SF_TOKENIZER_CACHE=tokenizer_cache,
               SF_GPU_BUDGET="10")  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    steps = json.loads((tmp_path / "steps.json").read_text())
    assert len(steps) == 7, steps
    status = [s["status"] for s in steps]
    assert all(s == "ok" or s.startswith(("timed out", "skipped")) for s in status), status
    assert status[-1] == "skipped: budget spent"  # the last rows never start
    assert seconds < 10 + 15 + 20  # the budget, SIGKILL's grace, the quick summary steps
    assert (tmp_path / "pytest_gpu.json").is_file()
    pair = json.loads((tmp_path / "pair.json").read_text())
    assert pair["mot"]["steps"] == 0 and pair["mot_over_dense_tokens_per_s"] is None
