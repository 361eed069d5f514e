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
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)


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
