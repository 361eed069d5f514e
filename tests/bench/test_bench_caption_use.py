"""``benchmarks/caption_use.py``: the three prefixes hold the same images (so the same noise and
timesteps meet the same latents), the shuffled prefix is another pair's caption, and the report
of a tiny Transfusion run is complete and finite for both image losses (with U-Net patch layers,
also the column without the transformer's output)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsefusion.data.sources import build_source
from sparsefusion.eval.pairs import read_pairs
from sparsefusion.runs.folder import run_config
from sparsefusion.runs.presets import resolve_config
from sparsefusion.runs.tokenizer import run_tokenizer
from sparsefusion.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("diffusers", reason="the transfusion extra is not installed")


def _script():
    spec = importlib.util.spec_from_file_location("caption_use", ROOT / "benchmarks/caption_use.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("image_loss, patch_layers", [("ddpm", "linear"), ("flow", "unet")])
def test_caption_use_report(tmp_path, tokenizer_cache, image_loss, patch_layers):
    run = tmp_path / "run"
    cfg = resolve_config("tf-dense-debug", [
        f"run.dir={run}", f"tokenizer.cache_dir={tokenizer_cache}", "run.progress=log",
        "run.eval_every=0", "data.val_batches=1", "train.steps=2",
        f"objective.image_loss={image_loss}", f"model.patch_layers={patch_layers}",
        "model.unet_width=8",
    ])  # fmt: skip
    train(cfg)
    cu = _script()
    cfg = run_config(run)
    pairs = read_pairs(build_source(cfg.data, seed=cfg.seed, split="val"), 4)
    tok = run_tokenizer(run, cfg)
    batches = {k: cu._batch(tok, cu._documents(pairs, k)) for k in cu.PREFIXES}
    for k in ("shuffled", "none"):
        torch.testing.assert_close(batches[k].latents_IZhw, batches["true"].latents_IZhw)
    assert batches["none"].num_tokens < batches["true"].num_tokens
    assert not torch.equal(batches["shuffled"].tokens_BT, batches["true"].tokens_BT)

    out = tmp_path / "caption_use.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/caption_use.py"), str(run), "--pairs", "4",
         "--timesteps", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["pairs"] == 4 and len(report["by_timestep"]) == 3
    for row in report["by_timestep"]:
        for k in cu.PREFIXES:
            assert math.isfinite(row[k]) and math.isfinite(row[f"{k}_x0"]), row
        assert row["true"] != row["shuffled"]  # the caption reaches the image positions
        if patch_layers == "unet":  # without the transformer's output the prediction changes
            assert math.isfinite(row["skips_only"]) and row["skips_only"] != row["true"]
        else:
            assert "skips_only" not in row
