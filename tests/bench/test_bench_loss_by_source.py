"""``benchmarks/loss_by_source.py`` and the seam it uses (``runs/data.py``'s ``fixed_batches``):
the validation batches are the ones training validates on, the training-split batches are other
documents, and a mixture run gets one validation and one training row per source."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from sparsefusion.runs.data import data_for, fixed_batches
from sparsefusion.runs.folder import run_config
from sparsefusion.runs.presets import resolve_config
from sparsefusion.runs.tokenizer import run_tokenizer
from sparsefusion.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]


def test_loss_by_source_rows_per_source_and_split(tmp_path, tokenizer_cache):
    run = tmp_path / "run"
    train(resolve_config("mot-debug", [
        f"run.dir={run}", f"tokenizer.cache_dir={tokenizer_cache}", "run.progress=log",
        "run.eval_every=0", "data.val_batches=2", "train.steps=2", "data.source=mixture",
        "data.mixture={scenes: 1.0}",
    ]))  # fmt: skip
    cfg = run_config(run)
    tok = run_tokenizer(run, cfg)
    val, same = data_for(cfg, "val", tok), fixed_batches(cfg, "val", tok)
    seen = fixed_batches(cfg, "train", tok)
    assert len(val) == len(seen) == 2
    assert all(torch.equal(a.tokens_BT, b.tokens_BT) for a, b in zip(val, same, strict=True))
    assert not torch.equal(val[0].tokens_BT, seen[0].tokens_BT)  # the training documents

    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/loss_by_source.py"), str(run), "--batches", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["source"], r["split"], r["step"]) for r in rows] == [
        ("scenes", "val", 2), ("scenes", "train", 2)]  # fmt: skip
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss/batch", "loss/batch/text",
                                                  "loss/batch/image"))  # fmt: skip
    assert rows[0]["loss/batch"] != rows[1]["loss/batch"]
    assert "| run | 2 | scenes | val |" in proc.stdout
