"""Sparse recipes end to end: presets run, upcycling (never twice), router losses, train-aux."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsefusion.checkpoint.store import latest_checkpoint
from sparsefusion.nn.routing_context import RouterRecord
from sparsefusion.runs.folder import read_metrics
from sparsefusion.runs.presets import resolve_config
from sparsefusion.train.aux_train import aux_bce
from sparsefusion.train.trainer import train

SPARSE = ["moe-8x", "moma-1t1i", "moma-4t4i", "mod", "moma-4t4i-mod", "mot-text-moe4"]


def _cfg(preset: str, run_dir: Path, cache: str, *extra: str):
    return resolve_config(
        preset,
        [
            f"run.dir={run_dir}",
            f"tokenizer.cache_dir={cache}",
            "run.progress=log",
            "run.log_every=1",
            "run.eval_every=0",
            "data.val_batches=1",
            *extra,
        ],
    )


def _rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r}


@pytest.mark.parametrize("name", SPARSE)
def test_each_sparse_preset_builds_and_runs_a_step(name, tmp_path, tokenizer_cache):
    last = train(_cfg(f"{name}-debug", tmp_path, tokenizer_cache, "train.steps=1"))
    assert last["train"]["loss"] > 0 and last["val"]["loss"] > 0
    row = _rows(tmp_path)[1]
    if "mod" in name:
        assert row["mod/selected_frac"] == pytest.approx(0.25, abs=0.01)
    if name.startswith(("moe", "moma-4", "mot")):
        assert 0 <= row["moe/unrouted_frac"] < 1
        assert any(k.endswith("/load_max") for k in row)
    # The demo-size preset resolves and keeps the dense model's width.
    demo = resolve_config(name, [])
    assert demo.model.dim == resolve_config("dense", []).model.dim


def test_token_choice_losses_reach_the_objective_and_the_log(tmp_path, tokenizer_cache):
    extra = ("train.steps=2", "model.moe.router=token_choice", "model.moe.top_k=2")
    train(_cfg("moe-8x-debug", tmp_path, tokenizer_cache, *extra))
    row = _rows(tmp_path)[2]
    assert row["moe/load_balance"] > 0 and row["moe/router_z"] > 0


def _loader_state(run_dir: Path, step: int) -> dict:
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "state.json"
    return json.loads(path.read_text())["loader"]


def test_upcycling_copies_once_keeps_data_position_and_checks_shapes(tmp_path, tokenizer_cache):
    seed = tmp_path / "seed"
    common = ("train.steps=4", "run.save_every=2", "run.keep_checkpoints=5")
    train(_cfg("moma-1t1i-debug", seed, tokenizer_cache, *common, "train.stop_at=2"))
    up = (*common, f"model.upcycle_from={seed}", "model.moe.gumbel_noise=true")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_cfg("moma-4t4i-debug", straight, tokenizer_cache, *up))
    train(_cfg("moma-4t4i-debug", resumed, tokenizer_cache, *up, "train.stop_at=2"))
    # The seed moves on: an upcycling that ran again on resume would copy other weights.
    train(_cfg("moma-1t1i-debug", seed, tokenizer_cache, *common))
    assert _loader_state(resumed, 2) == _loader_state(seed, 4)  # data position continued
    train(_cfg("moma-4t4i-debug", resumed, tokenizer_cache, *up))
    a, b = _rows(straight), _rows(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step]["loss"] == b[step]["loss"], step
    assert a[1]["lr"] < a[2]["lr"]  # the schedule restarted (warm-up from step 1)
    with pytest.raises(ValueError, match="shape mismatch"):
        train(_cfg("moma-4t4i-debug", tmp_path / "bad", tokenizer_cache, *up, "model.dim=64"))
    assert latest_checkpoint(tmp_path / "bad") is None


def test_train_aux_command_writes_routers_and_metrics(tmp_path, tokenizer_cache):
    run = tmp_path / "run"
    train(_cfg("moma-4t4i-mod-debug", run, tokenizer_cache, "train.steps=2"))
    cmd = [sys.executable, "-m", "sparsefusion", "train-aux", str(run), "aux.steps=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gap/loss=" in proc.stdout and "acc/mean=" in proc.stdout
    assert (run / "aux_routers" / "aux_routers.safetensors").is_file()
    row = read_metrics(run / "aux_routers" / "metrics.jsonl")[-1]
    for key in ("batch/loss", "causal/loss", "gap/loss", "acc/layer0_mod", "acc/layer1_ffn_text"):
        assert key in row, key
    assert 0 <= row["acc/mean"] <= 1
    assert "selected/mean=" in proc.stdout and row["selected/layer0_mod"] >= 0
    bad = subprocess.run(
        [sys.executable, "-m", "sparsefusion", "train-aux", str(run), "aux.stpes=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "did you mean 'steps'" in bad.stderr
    shutil.rmtree(run / "checkpoints")
    none = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert none.returncode == 2 and "no finished run" in none.stderr


class _FixedAux:
    """Aux routers whose logits are given (site -> (n, E) tensor)."""

    def __init__(self, logits):
        self._logits = logits

    def logits(self, site, x_nD):
        return self._logits[site]


def test_aux_bce_counts_correct_decisions_and_selections_of_each_mode():
    target_nE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # batch top-k: 2 selections
    logits_nE = torch.tensor([[3.0, 2.0], [-1.0, 1.0], [4.0, -2.0]])  # causal: 4 selections
    record = RouterRecord("layer0_ffn_text", torch.zeros(3, 4), target_nE)
    _, hits = aux_bce(_FixedAux({"layer0_ffn_text": logits_nE}), [record])
    correct, total, causal, batch = (float(v) for v in hits["layer0_ffn_text"])
    assert (correct, total, causal, batch) == (4.0, 6.0, 4.0, 2.0)
