"""A save onto a really full file system (a small tmpfs): a clear error, nothing left behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from sparsefusion.checkpoint import store as ck


@pytest.fixture()
def small_tmpfs(tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("mount is not available")
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_full_tmpfs_save_is_a_clear_error_and_cleans_up(small_tmpfs: Path):
    small = torch.nn.Linear(4, 2)
    ck.save_checkpoint(small_tmpfs, 1, small, torch.optim.AdamW(small.parameters()), {})
    big = torch.nn.Linear(256, 512)  # 0.5 MB of weights: more than the file system holds
    with pytest.raises(ck.CheckpointError) as e:
        ck.save_checkpoint(small_tmpfs, 2, big, torch.optim.AdamW(big.parameters()), {})
    message = str(e.value)
    assert "disk full" in message and "previous checkpoint is intact" in message
    assert str(small_tmpfs / "checkpoints" / "step_00000002") in message
    assert not list(ck.checkpoint_dir(small_tmpfs).glob(".tmp_step_*"))
    assert ck.latest_checkpoint(small_tmpfs).name == "step_00000001"
    loaded = torch.nn.Linear(4, 2)
    ck.load_checkpoint(ck.latest_checkpoint(small_tmpfs), loaded, None)
    assert torch.equal(loaded.weight, small.weight)


def _fill(mnt: Path) -> None:
    """Fill the file system until the next block allocation fails."""
    with open(mnt / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def test_full_disk_on_config_metrics_and_aux_routers(small_tmpfs: Path):
    """Issue 28: a one-line error naming the file; the previous contents stay whole."""
    from sparsefusion.nn.aux_router import AuxRouters
    from sparsefusion.runs.config import TrainConfig
    from sparsefusion.runs.folder import config_path, save_aux_routers, write_config
    from sparsefusion.train.metrics import MetricsLogger

    cfg = TrainConfig()
    write_config(small_tmpfs, cfg)
    before = config_path(small_tmpfs).read_bytes()
    metrics = MetricsLogger(small_tmpfs, tensorboard=False)
    metrics.log({"step": 1, "loss": 1.0})
    rows = (small_tmpfs / "metrics.jsonl").read_bytes()
    _fill(small_tmpfs)
    cfg.seed = 12345
    with pytest.raises(ck.DiskWriteError, match="disk full") as e:
        write_config(small_tmpfs, cfg)
    assert str(config_path(small_tmpfs)) in str(e.value) and "\n" not in str(e.value)
    assert config_path(small_tmpfs).read_bytes() == before
    with pytest.raises(ck.DiskWriteError, match="disk full.*metrics.jsonl"):
        metrics.log({"step": 2, "note": "x" * 20000})  # more than the last page holds
    assert (small_tmpfs / "metrics.jsonl").read_bytes() == rows
    aux = AuxRouters(256, {"l0_moe": 64, "l1_moe": 64})
    with pytest.raises(ck.DiskWriteError, match="disk full.*aux_routers.safetensors"):
        save_aux_routers(small_tmpfs, aux, {"step": 1})
    leftovers = [p.name for p in small_tmpfs.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_full_disk_on_export_is_one_line(
    small_tmpfs: Path, tmp_path: Path, tokenizer_cache, capsys
):
    from sparsefusion.cli.main import main
    from sparsefusion.runs.presets import resolve_config
    from sparsefusion.train.trainer import train

    run = tmp_path / "run"
    overrides = [f"run.dir={run}", f"tokenizer.cache_dir={tokenizer_cache}", "train.steps=2",
                 "run.eval_every=0", "run.progress=log", "train.threads=1"]  # fmt: skip
    train(resolve_config("mot-debug", overrides))
    _fill(small_tmpfs)
    assert main(["export", str(run), "--out", str(small_tmpfs / "export")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: disk full") and "\n" not in err
    assert str(small_tmpfs / "export" / "model.safetensors") in err
    assert not [p for p in (small_tmpfs / "export").iterdir()]
