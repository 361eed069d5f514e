"""The prepared GPU loss pair's CPU dry run: tokenizes once with parallel workers, plans the
steps from a probe, trains dense and MoT the same steps and writes the comparison (no rot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_pair_dry_run(tmp_path, tokenizer_cache):
    env = dict(os.environ, PYTHON=sys.executable, SF_TOKENIZER_CACHE=tokenizer_cache)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_pair.sh"), "--dry-run", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    steps = json.loads((tmp_path / "steps.json").read_text())
    assert [s["status"] for s in steps] == ["ok"] * 6, steps
    plan = json.loads((tmp_path / "plan.json").read_text())
    # The plan fills 85% of a run's box (less start-up) at the probe's rate; the dry run fixes 12.
    rate, per_step = plan["tokens_per_s"], plan["tokens_per_step"]
    want = int(0.85 * (plan["box_s"] - plan["startup_s"]) * rate / per_step)
    assert plan["planned_steps"] == want > 0 and plan["steps"] == 12
    pair = json.loads((tmp_path / "pair.json").read_text())
    for arch in ("dense", "mot"):
        run = pair[arch]
        assert run["steps"] == run["val_step"] == 12, run
        assert 0 < run["epochs"] == run["tokens"] / pair["shard_tokens"]
        assert set(run["val"]) == {"loss", "loss/text", "loss/image"}
    dense, mot = pair["dense"]["val"], pair["mot"]["val"]
    assert pair["mot_minus_dense"]["loss/image"] == mot["loss/image"] - dense["loss/image"]
    assert set(pair["savings_val"]) == {"loss", "loss/text", "loss/image"}
    assert "| mot |" in (tmp_path / "compare.md").read_text()
    # Two workers wrote the shards: every document once, both splits.
    manifest = json.loads((tmp_path / "work" / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] == 64
    assert len(manifest["splits"]["train"]["shards"]) == 4
