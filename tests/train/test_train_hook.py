"""run.eval_generate_every: the checkpoint hook runs after the step's save and changes no loss."""

from __future__ import annotations

from pathlib import Path

import torch

from sparsefusion.checkpoint.store import latest_checkpoint
from sparsefusion.runs.folder import read_metrics
from sparsefusion.runs.presets import resolve_config
from sparsefusion.train.trainer import train


def _cfg(run_dir: Path, cache: str, *extra: str):
    common = ["run.log_every=1", "run.save_every=100", "run.eval_every=0", "train.steps=4"]
    overrides = [f"run.dir={run_dir}", f"tokenizer.cache_dir={cache}", "run.progress=log"]
    return resolve_config("mot-debug", [*overrides, *common, *extra])


def test_hook_runs_after_each_nth_save_and_changes_no_loss(tmp_path: Path, tokenizer_cache):
    calls = []

    def hook(run_dir, model, cfg, step):
        assert latest_checkpoint(Path(run_dir)).name == f"step_{step:08d}"  # saved first
        calls.append(step)
        torch.rand(100)  # a hook that draws random numbers (sampling does)

    train(_cfg(tmp_path / "plain", tokenizer_cache))
    train(
        _cfg(tmp_path / "hooked", tokenizer_cache, "run.eval_generate_every=2"), on_checkpoint=hook
    )
    assert calls == [2, 4]
    plain = [r for r in read_metrics(tmp_path / "plain" / "metrics.jsonl") if "split" not in r]
    hooked = [r for r in read_metrics(tmp_path / "hooked" / "metrics.jsonl") if "split" not in r]
    assert [r["loss"] for r in plain] != [] and [r["loss"] for r in plain] == [
        r["loss"] for r in hooked
    ]


def test_hook_is_off_without_the_key(tmp_path: Path, tokenizer_cache):
    calls = []
    train(_cfg(tmp_path / "r", tokenizer_cache), on_checkpoint=lambda *a: calls.append(a))
    assert calls == []
