"""Evaluator networks shared by the eval tests: trained once per session, tiny (seconds)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_evaluator(tmp_path_factory) -> dict:
    """Tiny evaluator settings with one cache folder: every eval test shares one training."""
    cache = str(tmp_path_factory.mktemp("evaluator_cache"))
    return {
        "train_pairs": 500,
        "heldout_pairs": 96,
        "epochs": 3,
        "batch_size": 32,
        "cache_dir": cache,
    }
