"""Shared fixtures: one tokenizer cache for the whole session, GPU test skipping.

The test models are tiny, so every process (and every subprocess a test starts) uses one CPU
thread: faster than two here, and immune to oversubscription when several processes share cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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
