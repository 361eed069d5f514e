"""Training with U-Net patch layers (model.patch_layers=unet): every architecture's tf-*-debug
preset trains with them, resumed equals uninterrupted, and a resume that switches patch layers
is refused naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsefusion.runs.folder import read_metrics
from sparsefusion.runs.presets import resolve_config
from sparsefusion.train.trainer import train

pytest.importorskip("diffusers", reason="the transfusion extra is not installed")

ARCHS = ["dense", "mot", "moe", "moma", "mod", "hybrid"]
UNET = ("model.patch_layers=unet", "model.unet_width=16")


def _cfg(run_dir: Path, cache: str, *extra: str, arch: str = "mot"):
    return resolve_config(
        f"tf-{arch}-debug",
        [f"run.dir={run_dir}", f"tokenizer.cache_dir={cache}", "run.progress=log", *extra],
    )


def _steps(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_trains_with_unet_patch_layers(tmp_path, tokenizer_cache, arch):
    cfg = _cfg(tmp_path, tokenizer_cache, *UNET, "train.steps=2", "run.log_every=1", arch=arch)
    assert cfg.model.patch_layers == "unet"
    train(cfg)
    rows = _steps(tmp_path)
    assert sorted(rows) == [1, 2]
    assert all(r["loss/image"] > 0 and r["flops"] > 0 for r in rows.values())


def test_unet_resumed_equals_uninterrupted(tmp_path, tokenizer_cache):
    common = (*UNET, "run.log_every=1", "run.save_every=2", "run.eval_every=0", "train.steps=4")
    train(_cfg(tmp_path / "a", tokenizer_cache, *common))
    train(_cfg(tmp_path / "b", tokenizer_cache, *common, "train.stop_at=2"))
    train(_cfg(tmp_path / "b", tokenizer_cache, *common))
    a, b = _steps(tmp_path / "a"), _steps(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("loss/text", "loss/image", "flops"):
            assert a[step][key] == b[step][key], (step, key)


def test_resume_that_switches_patch_layers_is_refused(tmp_path, tokenizer_cache):
    common = ("train.steps=2", "run.save_every=2", "run.eval_every=0")
    train(_cfg(tmp_path, tokenizer_cache, *common))
    with pytest.raises(ValueError, match=r"model\.patch_layers: 'linear' -> 'unet'"):
        train(_cfg(tmp_path, tokenizer_cache, *common, *UNET, "train.steps=3"))
