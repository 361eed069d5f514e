"""Nothing lost: SIGKILL during training or during a save, then the same command resumes exactly;
NaN stops the run keeping the last good checkpoint (or is skipped); a full disk is a clear error.
"""

from __future__ import annotations

import errno
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from run_helpers import run_args, train_cli, train_rows, wait_for
from safetensors.torch import load_file

from sparsefusion.checkpoint import store as ck
from sparsefusion.runs.presets import resolve_config
from sparsefusion.runtime.faults import ENV
from sparsefusion.train.trainer import train


def _args(run_dir: Path, cache: str) -> list[str]:
    return run_args(run_dir, cache, save_every=2)


def _cli(run_dir: Path, cache: str, faults: str = "") -> subprocess.Popen:
    return train_cli(_args(run_dir, cache), faults)


_rows = train_rows


def _kill_when(proc: subprocess.Popen, marker: Path, timeout: float = 120) -> None:
    wait_for(proc, marker, timeout)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer_cache) -> dict[int, dict]:
    run_dir = tmp_path_factory.mktemp("straight")
    train(resolve_config("mot-debug", _args(run_dir, tokenizer_cache)))
    return _rows(run_dir)


def _assert_same(a: dict[int, dict], b: dict[int, dict]) -> None:
    assert sorted(a) == sorted(b) == list(range(1, 8))
    for step in a:
        for key in ("loss", "loss/text", "loss/image", "tokens", "flops", "lr", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)


@pytest.mark.parametrize(
    "fault, marker, kept",
    [
        ("pause_at_step=5", "fault_pause_at_step", "step_00000004"),
        ("pause_in_save=4", "fault_pause_in_save", "step_00000002"),
    ],
    ids=["during-training", "during-save"],
)
def test_sigkill_then_same_command_resumes_exactly(
    tmp_path: Path, tokenizer_cache: str, uninterrupted, fault: str, marker: str, kept: str
):
    run_dir = tmp_path / "run"
    _kill_when(_cli(run_dir, tokenizer_cache, fault), run_dir / marker)
    # The newest complete checkpoint is intact; a save cut short leaves only a temporary folder.
    assert ck.latest_checkpoint(run_dir).name == kept
    if "save" in fault:
        assert list(ck.checkpoint_dir(run_dir).glob(".tmp_step_00000004_*"))
    proc = _cli(run_dir, tokenizer_cache)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    _assert_same(uninterrupted, _rows(run_dir))
    assert not list(ck.checkpoint_dir(run_dir).glob(".tmp*"))


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path: Path, tokenizer_cache, monkeypatch):
    monkeypatch.setenv(ENV, "nan_at_step=5")
    run_dir = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 5") as e:
        train(resolve_config("mot-debug", _args(run_dir, tokenizer_cache)))
    assert "step_00000004" in str(e.value) and "train.skip_nonfinite=true" in str(e.value)
    last = ck.latest_checkpoint(run_dir)
    assert last.name == "step_00000004"
    weights = load_file(str(last / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert max(_rows(run_dir)) == 4


def test_nan_skipped_with_option(tmp_path: Path, tokenizer_cache, monkeypatch, uninterrupted):
    monkeypatch.setenv(ENV, "nan_at_step=5")
    run_dir = tmp_path / "run"
    train(
        resolve_config("mot-debug", [*_args(run_dir, tokenizer_cache), "train.skip_nonfinite=true"])
    )
    rows = _rows(run_dir)
    assert 5 not in rows  # nothing to log for a step whose update was skipped
    assert rows[4]["skipped_steps"] == 0 and rows[7]["skipped_steps"] == 1
    assert rows[4]["loss"] == uninterrupted[4]["loss"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows.values())


def test_nan_cli_exit_code_and_message(tmp_path: Path, tokenizer_cache: str):
    proc = _cli(tmp_path / "run", tokenizer_cache, "nan_at_step=3")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "non-finite loss or gradient at step 3" in err.decode()


def test_full_disk_names_the_path(tmp_path: Path, monkeypatch):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    ck.save_checkpoint(tmp_path, 1, model, opt, {})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(ck.CheckpointError) as e:
        ck.save_checkpoint(tmp_path, 2, model, opt, {})
    assert "disk full" in str(e.value) and str(tmp_path / "checkpoints" / "step_00000002") in str(
        e.value
    )
    assert ck.latest_checkpoint(tmp_path).name == "step_00000001"
