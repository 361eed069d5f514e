"""The prepared GPU check's CPU dry run completes and writes every JSON result (no rot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path, tokenizer_cache):
    env = dict(os.environ, PYTHON=sys.executable, SF_TOKENIZER_CACHE=tokenizer_cache)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    for name in ("env", "bench_545m", "pytest_gpu", "pipeline", "pair"):
        assert (tmp_path / f"{name}.json").is_file(), name
    pair = json.loads((tmp_path / "pair.json").read_text())
    assert pair["dense"]["steps"] == pair["mot"]["steps"] == 4
    assert pair["mot"]["tokens_per_s"] > 0
    pipeline = json.loads((tmp_path / "pipeline.json").read_text())
    assert set(pipeline) >= {"loader", "gpu", "breakdown", "trainer"}
    assert pipeline["loader"]["token_shards"]["tokens_per_s"] > 0
    assert set(pipeline["breakdown"]["dense/fused"]) >= {"data", "forward", "backward", "optimizer"}
