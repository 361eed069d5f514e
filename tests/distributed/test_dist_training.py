"""Two CPU processes (gloo): FSDP2 and DDP equal one process; sharded checkpoints reshard.

Comparable runs: 2 ranks x ``data.batch_size=2`` x ``grad_accum=1`` against 1 process x
``data.batch_size=2`` x ``grad_accum=2``. Both split the corpus into the same 2 data streams
(``data/shards.py``), so every optimizer step sees the same documents in the same rows; only the
order of floating-point gradient sums differs. Tolerance: 1e-4 absolute on the logged loss
(measured differences are about 1e-6 or below).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from dist_helpers import run_distributed_test
from safetensors.torch import load_file

from sparsefusion.runs.export import export_run
from sparsefusion.runs.folder import read_metrics
from sparsefusion.runs.presets import resolve_config
from sparsefusion.train.trainer import train

pytestmark = pytest.mark.distributed

LOSS_TOL = 1e-4
# (arch, strategy, activation checkpointing): AC variants ride along at no extra cost.
CASES = [
    ("dense", "ddp", "none"),
    ("dense", "fsdp", "full"),
    ("mot", "ddp", "selective"),
    ("mot", "fsdp", "none"),
    ("moma-4t4i", "fsdp", "full"),
    ("moma-4t4i-mod", "ddp", "none"),
    ("tf-mot-unet", "fsdp", "none"),
    ("tf-mot-flow", "ddp", "none"),
]
# Case name -> (preset, overrides) where a case is not a preset of its own.
VARIANTS = {
    "tf-mot-unet": ("tf-mot", ("model.patch_layers=unet", "model.unet_width=16")),
    "tf-mot-flow": ("tf-mot", ("objective.image_loss=flow",)),
}


def _cfg(run_dir: Path, cache: str, arch: str, *extra: str):
    preset, overrides = VARIANTS.get(arch, (arch, ()))
    return resolve_config(
        f"{preset}-debug",
        [
            *overrides,
            f"run.dir={run_dir}",
            f"tokenizer.cache_dir={cache}",
            "run.progress=log",
            "run.log_every=1",
            "run.eval_every=0",
            "run.save_every=3",
            "train.steps=6",
            "train.threads=1",
            "data.batch_size=2",
            *extra,
        ],
    )


def _two_rank_runs(rank: int, world: int, root: str, cache: str, cases: list) -> None:
    for arch, strategy, ac in cases:
        extra = (f"dist.strategy={strategy}", f"dist.activation_checkpointing={ac}")
        train(_cfg(Path(root) / f"{arch}-{strategy}", cache, arch, *extra))


def _resume_two_ranks(rank: int, world: int, run_dirs: list[str], cache: str) -> None:
    for run_dir in run_dirs:
        train(_cfg(Path(run_dir), cache, "mot", "dist.strategy=fsdp"))


def _losses(run_dir: Path) -> dict[int, float]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return {r["step"]: r["loss"] for r in rows if "split" not in r}


def _copy_at_step3(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step_00000006")
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_cache) -> Path:
    """One process per arch (grad_accum 2), then every 2-rank case in one spawn."""
    root = tmp_path_factory.mktemp("dist_runs")
    for arch in dict.fromkeys(arch for arch, _, _ in CASES):
        train(_cfg(root / f"{arch}-single", tokenizer_cache, arch, "train.grad_accum=2"))
    run_distributed_test(_two_rank_runs, 2, args=(str(root), tokenizer_cache, CASES))
    return root


@pytest.mark.parametrize("arch, strategy, ac", CASES)
def test_two_ranks_equal_one_process(runs: Path, arch: str, strategy: str, ac: str):
    single, multi = _losses(runs / f"{arch}-single"), _losses(runs / f"{arch}-{strategy}")
    assert sorted(single) == sorted(multi) == [1, 2, 3, 4, 5, 6]
    diff = max(abs(single[s] - multi[s]) for s in single)
    print(f"{arch} {strategy} (AC {ac}): max |loss diff| over 6 steps = {diff:.3g}")
    assert diff < LOSS_TOL
    a = read_metrics(runs / f"{arch}-single" / "metrics.jsonl")[-1]
    b = read_metrics(runs / f"{arch}-{strategy}" / "metrics.jsonl")[-1]
    assert a["tokens"] == b["tokens"] and a["flops"] == pytest.approx(b["flops"])


def test_sharded_checkpoint_layout(runs: Path):
    ckpt = runs / "mot-fsdp" / "checkpoints" / "step_00000006"
    assert (ckpt / "dcp" / ".metadata").is_file()
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert sorted(p.name for p in (ckpt / "data").iterdir()) == [
        "shard_00000.json",
        "shard_00001.json",
    ]
    assert not list((runs / "mot-fsdp" / "checkpoints").glob(".tmp*"))


@pytest.fixture(scope="module")
def resumed_on_two_ranks(runs: Path, tokenizer_cache: str) -> Path:
    """Step-3 copies of the 2-rank FSDP run and of the 1-process run, resumed on 2 ranks."""
    root = runs / "resumed"
    dirs = [
        _copy_at_step3(runs / "mot-fsdp", root / "from-fsdp"),
        _copy_at_step3(runs / "mot-single", root / "from-single"),
    ]
    run_distributed_test(_resume_two_ranks, 2, args=([str(d) for d in dirs], tokenizer_cache))
    return root


def test_sharded_round_trip_on_two_ranks(runs: Path, resumed_on_two_ranks: Path):
    """Resume the 2-rank FSDP run from its step-3 checkpoint: steps 4-6 repeat exactly."""
    assert _losses(resumed_on_two_ranks / "from-fsdp") == _losses(runs / "mot-fsdp")


def test_single_process_checkpoint_resumes_on_two_ranks(runs: Path, resumed_on_two_ranks: Path):
    """A safetensors checkpoint (1 process, grad_accum 2) continues under FSDP on 2 ranks."""
    a, b = _losses(resumed_on_two_ranks / "from-single"), _losses(runs / "mot-single")
    assert sorted(a) == [1, 2, 3, 4, 5, 6]
    assert max(abs(a[s] - b[s]) for s in a) < LOSS_TOL


def test_reshard_two_to_one(runs: Path, tmp_path: Path, tokenizer_cache: str):
    """The 2-rank FSDP checkpoint resumes in one process (grad_accum 2 keeps both streams)."""
    run_dir = _copy_at_step3(runs / "mot-fsdp", tmp_path / "one")
    train(_cfg(run_dir, tokenizer_cache, "mot", "train.grad_accum=2"))
    a, b = _losses(run_dir), _losses(runs / "mot-fsdp")
    assert max(abs(a[s] - b[s]) for s in a) < LOSS_TOL
    # Its new checkpoint is single-process safetensors again.
    assert (run_dir / "checkpoints" / "step_00000006" / "model.safetensors").is_file()


def test_reshard_to_other_stream_count_warns(runs: Path, tmp_path: Path, tokenizer_cache, caplog):
    """1 process x grad_accum 1 (1 stream) from a 2-stream checkpoint: restart, with a warning."""
    run_dir = _copy_at_step3(runs / "mot-fsdp", tmp_path / "remap")
    train(_cfg(run_dir, tokenizer_cache, "mot"))
    assert "streams restart after document" in caplog.text
    assert sorted(_losses(run_dir)) == [1, 2, 3, 4, 5, 6]


def test_export_of_sharded_run_matches_single_process(runs: Path, tmp_path: Path):
    out = export_run(runs / "mot-fsdp", tmp_path / "export")
    sharded = load_file(str(out / "model.safetensors"))
    single = load_file(
        str(runs / "mot-single" / "checkpoints" / "step_00000006" / "model.safetensors")
    )
    assert sharded.keys() == single.keys()
    for k in sharded:
        torch.testing.assert_close(sharded[k], single[k], atol=1e-5, rtol=1e-4)
