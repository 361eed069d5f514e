"""Two processes equal one process with grad_accum=2 (token-weighted across ranks, gloo)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dist_helpers import run_distributed_test

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_train_step import _batch, _grads, _max_rel, _model  # noqa: E402

from sparsefusion.distributed.mesh import DistEnv  # noqa: E402
from sparsefusion.objectives.base import ObjectiveConfig, build_objective  # noqa: E402
from sparsefusion.train.step import accumulate_gradients  # noqa: E402


def _two_rank_grads(rank: int, world: int, preset: str, path: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = _model(preset, [])
    objective = build_objective(ObjectiveConfig(), model.cfg)
    halves = [_batch(3, rows=2, ignore_from=6), _batch(4, rows=2)]
    ddp = DistributedDataParallel(model)
    accumulate_gradients(ddp, [halves[rank]], objective, env=replace(DistEnv(), world_size=world))
    if rank == 0:
        torch.save(_grads(model), path)
    del ddp  # the reducer's threads end before the group does (no abort at exit)
    torch.distributed.barrier()


@pytest.mark.distributed
@pytest.mark.parametrize("preset", ["dense-debug", "mot-debug"])
def test_two_processes_equal_one_process_with_grad_accum_two(preset, tmp_path):
    path = str(tmp_path / "grads.pt")
    run_distributed_test(_two_rank_grads, 2, args=(preset, path))
    model = _model(preset, [])
    objective = build_objective(ObjectiveConfig(), model.cfg)
    halves = [_batch(3, rows=2, ignore_from=6), _batch(4, rows=2)]
    accumulate_gradients(model, halves, objective, env=DistEnv())
    assert _max_rel(torch.load(path), _grads(model)) < 1e-6
