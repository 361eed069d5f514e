"""``sparsefusion export``: one safetensors file + config that loads without torch.distributed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sparsefusion.runs.presets import resolve_config
from sparsefusion.train.trainer import train

LOAD = """
import sys, torch
from safetensors.torch import load_file
from sparsefusion.runs.export import load_exported
model = load_exported(sys.argv[1])
ref = load_file(sys.argv[2])
assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
assert "torch.distributed.checkpoint" not in sys.modules
print("ok", sum(p.numel() for p in model.parameters()))
"""


def test_export_cli_then_load_without_distributed(tmp_path: Path, tokenizer_cache: str):
    run_dir = tmp_path / "run"
    args = [f"run.dir={run_dir}", f"tokenizer.cache_dir={tokenizer_cache}", "run.progress=log"]
    train(resolve_config("mot-debug", [*args, "train.steps=2", "train.threads=1"]))
    out = tmp_path / "exported"
    cmd = [sys.executable, "-m", "sparsefusion", "export", str(run_dir), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    ckpt = run_dir / "checkpoints" / "step_00000002" / "model.safetensors"
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, str(out), str(ckpt)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]


def test_export_of_empty_run_is_a_clear_error(tmp_path: Path):
    cmd = [sys.executable, "-m", "sparsefusion", "export", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "holds no complete checkpoint" in proc.stderr
