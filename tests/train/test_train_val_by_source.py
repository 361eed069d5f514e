"""``data.val_source_batches``: a mixture run's validation rows carry each source's loss beside
the mix's, and those values are what the checkpoint scores on each source's batches alone."""

from __future__ import annotations

import json
import math

import pytest

from sparsefusion.data.sources import DataConfig
from sparsefusion.objectives.base import build_objective
from sparsefusion.objectives.validate import evaluate
from sparsefusion.runs.data import fixed_batches, source_batches
from sparsefusion.runs.folder import load_model, run_config
from sparsefusion.runs.presets import resolve_config
from sparsefusion.runs.tokenizer import run_tokenizer
from sparsefusion.train.trainer import train


def _text_jsonl(path):
    words = "red green blue yellow square circle small large left right above below".split()
    lines = [
        json.dumps([{"text": " ".join(words[(i + j) % len(words)] for j in range(12)) + "."}])
        for i in range(240)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_val_rows_carry_each_source_and_match_a_direct_evaluation(tmp_path, tokenizer_cache):
    run = tmp_path / "run"
    data = _text_jsonl(tmp_path / "words.jsonl")
    train(resolve_config("mot-debug", [
        f"run.dir={run}", f"tokenizer.cache_dir={tokenizer_cache}", "run.progress=log",
        "run.eval_every=1", "train.steps=2", "data.val_batches=1", "data.source=mixture",
        "data.mixture={scenes: 1.0, path: 1.0}", f"data.path={data}", "data.val_fraction=0.25",
        "data.val_source_batches=1",
    ]))  # fmt: skip
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("split") == "val"]
    assert [r["step"] for r in val] == [1, 2]
    last = val[-1]
    for key in ("loss/source/scenes", "loss/source/scenes/image", "loss/source/path"):
        assert math.isfinite(last[key]), key
    assert "loss/source/path/image" not in last  # the text-only source has no image tokens
    assert last["loss/source/scenes"] != last["loss/source/path"]

    cfg = run_config(run)
    tok = run_tokenizer(run, cfg)
    model, _, _ = load_model(run, cfg, None, "cpu")
    objective = build_objective(cfg.objective, cfg.model)
    by_source = source_batches(cfg, "val", tok, num_batches=1)
    assert list(by_source) == ["scenes", "path"]
    for name, batches in by_source.items():
        direct = evaluate(model, batches, objective)
        assert last[f"loss/source/{name}"] == pytest.approx(direct["loss"], rel=1e-5)
    mix = evaluate(model, fixed_batches(cfg, "val", tok), objective)
    assert last["loss"] == pytest.approx(mix["loss"], rel=1e-5)


def test_val_source_batches_needs_a_mixture():
    with pytest.raises(ValueError, match="data.val_source_batches needs data.source=mixture"):
        DataConfig(source="scenes", val_source_batches=2)
    with pytest.raises(ValueError, match="data.val_source_batches must be >= 0"):
        DataConfig(source="mixture", mixture={"scenes": 1.0}, val_source_batches=-1)
