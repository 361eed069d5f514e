"""Fuzzing checkpoints (issue 28): any mutation of the newest checkpoint of a run (truncation,
byte flips, keys added, removed or renamed, type changes in state.json, tensors added, removed,
renamed, reshaped, cast or made non-finite) leaves resume and ``pick_checkpoint`` (eval, export,
generate, serve) on a valid checkpoint (step 4, or the mutated step 6 where it stayed valid);
never an error, a traceback or a hang. Seeded (derandomized) and bounded;
``benchmarks/fuzz_checkpoints.py`` runs more examples."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from checkpoint_fuzz import base_run, check_pick, check_resume, mutations
from hypothesis import HealthCheck, given, settings

from sparsefusion.checkpoint.store import checkpoint_dir
from sparsefusion.models.transformer import Transformer
from sparsefusion.runs.folder import run_config

FUZZ = dict(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_cache) -> Path:
    return base_run(tmp_path_factory.mktemp("fuzz_base"), tokenizer_cache)


@settings(max_examples=100, **FUZZ)
@given(mutation=mutations())
def test_pick_checkpoint_survives_any_mutation(base, tmp_path, mutation):
    work = tmp_path / "pick"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work)
    mutation.apply(checkpoint_dir(work) / "step_00000006")
    check_pick(work, Transformer(run_config(work).model))


@settings(max_examples=24, **FUZZ)
@given(mutation=mutations())
def test_resume_survives_any_mutation(base, tmp_path, tokenizer_cache, mutation):
    check_resume(base, tmp_path / "resume", tokenizer_cache, mutation)
