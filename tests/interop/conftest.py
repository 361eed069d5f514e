"""Fixtures: tiny random Hugging Face models, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from interop_helpers import make_llama, make_mistral, make_qwen2


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    return make_llama(tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    return make_mistral(tmp_path_factory.mktemp("hf") / "mistral")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    return make_qwen2(tmp_path_factory.mktemp("hf") / "qwen2")


@pytest.fixture(scope="session")
def mot_run(tiny_llama, tmp_path_factory) -> Path:
    """A 3-step MoT run started from the tiny Llama (init.from_hf)."""
    from sparsefusion.runs.presets import resolve_config
    from sparsefusion.train.trainer import train

    run = tmp_path_factory.mktemp("mot") / "run"
    cache = tmp_path_factory.mktemp("tok")
    cfg = resolve_config("mot-debug", [f"run.dir={run}", f"tokenizer.cache_dir={cache}",
                                       f"init.from_hf={tiny_llama}", "train.steps=3",
                                       "run.progress=log", "run.log_every=1", "run.eval_every=0",
                                       "data.val_batches=1", "optim.warmup_steps=0"])  # fmt: skip
    train(cfg)
    return run
