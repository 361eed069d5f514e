"""Preemption and concurrent runs: SIGTERM saves the step it was on and exits 143, the same
command resumes exactly; a second signal exits at once; a second trainer on a run folder is
refused while the first runs, and a killed trainer's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from run_helpers import run_args, train_cli, train_rows, wait_for

from sparsefusion.checkpoint import store as ck
from sparsefusion.runs.presets import resolve_config
from sparsefusion.runtime import run_lock
from sparsefusion.train.trainer import train


def _args(run_dir: Path, cache: str) -> list[str]:
    return run_args(run_dir, cache, save_every=3)


def _cli(run_dir: Path, cache: str, faults: str = "") -> subprocess.Popen:
    return train_cli(_args(run_dir, cache), faults)


_rows = train_rows
_wait_for = wait_for


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer_cache) -> dict[int, dict]:
    run_dir = tmp_path_factory.mktemp("straight")
    train(resolve_config("mot-debug", _args(run_dir, tokenizer_cache)))
    return _rows(run_dir)


def test_sigterm_saves_the_current_step_and_the_same_command_resumes_exactly(
    tmp_path, tokenizer_cache, uninterrupted
):
    run_dir = tmp_path / "run"
    proc = _cli(run_dir, tokenizer_cache, "sigterm_at_step=5")  # step 5 is no save step
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err.decode()[-3000:]
    assert "SIGTERM: stopped after step 5; checkpoint" in err.decode()
    assert ck.latest_checkpoint(run_dir).name == "step_00000005"
    assert max(_rows(run_dir)) == 5
    proc = _cli(run_dir, tokenizer_cache)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    rows = _rows(run_dir)
    assert sorted(rows) == sorted(uninterrupted) == list(range(1, 8))
    for step in rows:
        for key in ("loss", "loss/text", "loss/image", "tokens", "flops", "lr", "grad_norm"):
            assert rows[step][key] == uninterrupted[step][key], (step, key)


def test_second_signal_exits_at_once(tmp_path, tokenizer_cache):
    run_dir = tmp_path / "run"
    proc = _cli(run_dir, tokenizer_cache, "pause_at_step=4")  # hangs before saving step 4
    _wait_for(proc, run_dir / "fault_pause_at_step")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-3000:]
    assert "second SIGINT: exiting at once" in err.decode()
    assert "Traceback" not in err.decode()
    assert ck.latest_checkpoint(run_dir).name == "step_00000003"


def test_second_trainer_on_a_locked_run_folder_is_refused(tmp_path, tokenizer_cache):
    run_dir = tmp_path / "run"
    first = _cli(run_dir, tokenizer_cache, "pause_at_step=2")
    try:
        _wait_for(first, run_dir / "fault_pause_at_step")
        second = _cli(run_dir, tokenizer_cache)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2  # a usage error, as documented
        assert f"is in use by another trainer (host {os.uname().nodename}, PID {first.pid}" in (
            err.decode()
        )
        assert max(_rows(run_dir)) == 2  # the second trainer wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The killed trainer's lock is stale: the next trainer takes it over and finishes.
    third = _cli(run_dir, tokenizer_cache)
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err.decode()[-3000:]
    assert f"taking over the stale lock of host {os.uname().nodename}, PID {first.pid}" in (
        err.decode()
    )
    assert max(_rows(run_dir)) == 7


def test_lock_is_released_after_a_run(tmp_path):
    fd = run_lock.acquire(tmp_path)
    with pytest.raises(run_lock.RunLocked, match=f"PID {os.getpid()}"):
        run_lock.acquire(tmp_path)
    run_lock.release(fd)
    run_lock.release(run_lock.acquire(tmp_path))


def test_signal_before_the_first_step_exits_at_once_with_its_code():
    from sparsefusion.runtime import preempt

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(preempt.Preempted, match="before training started") as e:
        with preempt.handlers():
            signal.raise_signal(signal.SIGINT)
    assert e.value.code == 130 and isinstance(e.value, SystemExit)
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are restored
