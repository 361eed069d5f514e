"""Beyond one machine, as far as one machine allows: two torchrun "nodes" of one process each
(c10d rendezvous on localhost, gloo) train and resume exactly like one node of two processes,
with the default ``dist.strategy=auto`` (FSDP2 under a multi-process launch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_helpers import free_port

from sparsefusion.distributed.parallelize import DistConfig
from sparsefusion.runs.folder import read_metrics

pytestmark = pytest.mark.distributed

COMMON = (
    "run.progress=log", "run.log_every=1", "run.eval_every=0", "run.save_every=2",
    "train.steps=5", "train.threads=1", "data.batch_size=2",
)  # fmt: skip


def _train_cmd(launcher: list[str], run_dir: Path, cache: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "sparsefusion",
            "train", "mot-debug", f"run.dir={run_dir}", f"tokenizer.cache_dir={cache}",
            *COMMON, *extra]  # fmt: skip


def _run_all(cmds: list[list[str]]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for c in cmds]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")
            if "split" not in r}  # fmt: skip


def test_auto_strategy_resolves_by_process_count():
    assert DistConfig().resolved_strategy(distributed=True) == "fsdp"
    assert DistConfig().resolved_strategy(distributed=False) == "none"
    assert DistConfig(strategy="ddp").resolved_strategy(distributed=True) == "ddp"


def test_two_single_process_nodes_equal_one_node_of_two(tmp_path: Path, tokenizer_cache: str):
    one_node = tmp_path / "one_node"
    _run_all([_train_cmd(["--standalone", "--nproc_per_node", "2"], one_node, tokenizer_cache)])
    two_nodes = tmp_path / "two_nodes"
    for extra in (("train.stop_at=3",), ()):  # stop after step 3, then resume to the end
        port = free_port()
        launcher = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                    "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "sf-test"]  # fmt: skip
        _run_all([_train_cmd(launcher, two_nodes, tokenizer_cache, *extra)] * 2)
    a, b = _losses(one_node), _losses(two_nodes)
    assert sorted(a) == sorted(b) == list(range(1, 6))
    assert a == b
    log = (two_nodes / "train.log").read_text()
    assert "resumed from" in log and "strategy fsdp" in log
