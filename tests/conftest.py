"""Shared fixtures: one tokenizer cache for the whole session, GPU test skipping."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory) -> str:
    """A tokenizer cache folder shared by every training test of the session."""
    return str(tmp_path_factory.mktemp("tokenizer_cache"))
