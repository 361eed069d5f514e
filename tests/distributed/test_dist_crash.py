"""torchrun with 2 CPU processes: SIGKILL of the whole job during a sharded save, then resume.

The resumed 2-rank FSDP run (background loading, 3 batches queued per stream) must match one
uninterrupted process that reads the same 2 data streams (grad_accum 2) within the parity
tolerance of test_dist_training.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsefusion.checkpoint.store import checkpoint_dir, latest_checkpoint
from sparsefusion.runs.folder import read_metrics
from sparsefusion.runs.presets import resolve_config
from sparsefusion.runtime.faults import ENV
from sparsefusion.train.trainer import train

pytestmark = pytest.mark.distributed

LOSS_TOL = 1e-4
COMMON = (
    "run.progress=log",
    "run.log_every=1",
    "run.eval_every=0",
    "run.save_every=2",
    "train.steps=6",
    "train.threads=1",
    "data.batch_size=2",
    "data.workers=1",  # background loading: the state saved is that of the consumed batches
    "data.prefetch=3",
)


def _torchrun(run_dir: Path, cache: str, faults: str = "") -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "sparsefusion",
        "train",
        "mot-debug",
        f"run.dir={run_dir}",
        f"tokenizer.cache_dir={cache}",
        "dist.strategy=fsdp",
        *COMMON,
    ]
    env = dict(os.environ, **{ENV: faults, "OMP_NUM_THREADS": "1"})
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc); torchrun puts workers in their own sessions."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid] + [d for k in kids for d in _tree(int(k))]


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once, like a lost node."""
    for pid in _tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _losses(run_dir: Path) -> dict[int, float]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return {r["step"]: r["loss"] for r in rows if "split" not in r}


def test_torchrun_killed_during_sharded_save_resumes(tmp_path: Path, tokenizer_cache: str):
    reference = tmp_path / "reference"
    train(
        resolve_config(
            "mot-debug",
            [f"run.dir={reference}", f"tokenizer.cache_dir={tokenizer_cache}", *COMMON]
            + ["train.grad_accum=2"],
        )
    )
    run_dir = tmp_path / "run"
    proc = _torchrun(run_dir, tokenizer_cache, "pause_in_save=4")
    deadline = time.monotonic() + 180
    try:
        while not (run_dir / "fault_pause_in_save").exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the fault point was never reached"
            time.sleep(0.1)
        time.sleep(0.5)  # let both ranks reach the pause
    finally:
        _kill_job(proc)
    assert latest_checkpoint(run_dir).name == "step_00000002"
    assert list(checkpoint_dir(run_dir).glob(".tmp_step_00000004*"))

    proc = _torchrun(run_dir, tokenizer_cache)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert out.decode().count("final val") == 1  # rank 0 alone prints
    a, b = _losses(run_dir), _losses(reference)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    diff = max(abs(a[s] - b[s]) for s in a)
    print(f"killed 2-rank FSDP run, resumed: max |loss diff| vs uninterrupted = {diff:.3g}")
    assert diff < LOSS_TOL
