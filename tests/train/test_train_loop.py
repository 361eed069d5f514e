"""End-to-end training: the CLI run folder contract, and resumed equals uninterrupted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsefusion.runs.folder import read_metrics
from sparsefusion.runs.presets import resolve_config
from sparsefusion.train.trainer import train


def _cfg(run_dir: Path, cache: str, *extra: str, preset: str = "mot-debug"):
    return resolve_config(
        preset, [f"run.dir={run_dir}", f"tokenizer.cache_dir={cache}", "run.progress=log", *extra]
    )


def _train_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r}


def test_resumed_equals_uninterrupted(tmp_path: Path, tokenizer_cache: str):
    common = ("run.log_every=1", "run.save_every=3", "run.eval_every=0", "train.steps=6")
    train(_cfg(tmp_path / "straight", tokenizer_cache, *common))
    # The interrupted run: stop after 3 steps (same schedule length), then resume to 6.
    interrupted = tmp_path / "resumed"
    train(_cfg(interrupted, tokenizer_cache, *common, "train.stop_at=3"))
    assert len(_train_rows(interrupted)) == 3
    train(_cfg(interrupted, tokenizer_cache, *common))
    a, b = _train_rows(tmp_path / "straight"), _train_rows(interrupted)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        for key in ("loss", "loss/text", "loss/image", "tokens", "flops", "lr"):
            assert a[step][key] == b[step][key], (step, key)


def test_cli_train_writes_the_run_folder(tmp_path: Path, tokenizer_cache: str):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "sparsefusion",
        "train",
        "mot-debug",
        f"run.dir={run_dir}",
        f"tokenizer.cache_dir={tokenizer_cache}",
        "train.steps=10",
        "run.tensorboard=true",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final val" in proc.stdout
    assert (run_dir / "config.yaml").is_file()
    rows = read_metrics(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "split" not in r]
    val_rows = [r for r in rows if r.get("split") == "val"]
    assert train_rows and val_rows
    for key in (
        "step",
        "tokens",
        "flops",
        "loss",
        "loss/text",
        "loss/image",
        "lr",
        "tokens_per_s",
        "load",
    ):
        assert key in train_rows[-1], key
    assert {"loss", "loss/text", "loss/image"} <= set(val_rows[-1])
    assert train_rows[-1]["flops"] > train_rows[0]["flops"] > 0
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert ckpts and (ckpts[-1] / "model.safetensors").is_file()
    assert json.loads((ckpts[-1] / "state.json").read_text())["step"] == 10
    assert list((run_dir / "tb").iterdir())


def test_bad_override_fails_before_training(tmp_path: Path):
    cmd = [sys.executable, "-m", "sparsefusion", "train", "mot-debug", "model.dimm=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.dimm" in proc.stderr and "did you mean 'dim'" in proc.stderr


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.num_heads=5", "num_heads"),
        ("model.towers={text: t, video: v}", "video"),
    ],
)
def test_impossible_model_config_is_reported(override: str, words: str):
    from sparsefusion.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match=words):
        resolve_config("mot-debug", [override])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_flex_attention_training_on_cpu_is_refused(tmp_path: Path, tokenizer_cache: str):
    cfg = _cfg(tmp_path / "flex", tokenizer_cache, "model.attention_backend=flex", "train.steps=1")
    with pytest.raises(ValueError, match="attention_backend=flex trains only on CUDA"):
        train(cfg)
