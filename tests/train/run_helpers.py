"""Run the trainer in a subprocess with injected faults (crash and preemption tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sparsefusion.runs.folder import read_metrics
from sparsefusion.runtime.faults import ENV


def run_args(run_dir: Path, cache: str, save_every: int) -> list[str]:
    """Overrides of a 7-step ``mot-debug`` run logging every step."""
    common = ["run.progress=log", "run.log_every=1", "run.eval_every=0", "train.steps=7"]
    return [f"run.dir={run_dir}", f"tokenizer.cache_dir={cache}", *common,
            f"run.save_every={save_every}", "train.threads=1"]  # fmt: skip


def train_cli(args: list[str], faults: str = "") -> subprocess.Popen:
    """``python -m sparsefusion train mot-debug ARGS`` with ``SPARSEFUSION_FAULTS=faults``."""
    env = dict(os.environ, **{ENV: faults})
    cmd = [sys.executable, "-m", "sparsefusion", "train", "mot-debug", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def train_rows(run_dir: Path) -> dict[int, dict]:
    """The training rows of a run's metrics.jsonl by step."""
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r}


def wait_for(proc: subprocess.Popen, marker: Path, timeout: float = 120) -> None:
    """Wait until a fault point wrote ``marker`` (the process must still be running)."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline, "the fault point was never reached"
        time.sleep(0.05)
