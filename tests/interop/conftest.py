"""Fixtures: tiny random Hugging Face models, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from interop_helpers import make_llama, make_qwen2


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    return make_llama(tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    return make_qwen2(tmp_path_factory.mktemp("hf") / "qwen2")
