"""Background loading: the same batches as the synchronous path, a state of the consumed batches,
worker errors that reach the trainer, no hang on close, and an exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsefusion.data.documents import TEXT, Document, Segment
from sparsefusion.data.issues import BadInput
from sparsefusion.data.prefetch import BatchStream, resolve_workers
from sparsefusion.data.shards import ShardedLoaders
from sparsefusion.runs.folder import read_metrics
from sparsefusion.runs.presets import resolve_config
from sparsefusion.runtime.faults import ENV
from sparsefusion.train.trainer import train


class _Tok:
    modalities = ["text"]

    def encode_documents(self, docs):
        out = []
        for d in docs:
            ids = [10 + b for b in d.segments[0].payload.encode()]
            out.append(([1, *ids, 2], [0] * (len(ids) + 2)))
        return out


class _Source:
    """Document ``i`` has length 3 + i % 11; every 7th is a bad record; ``fail_at`` raises."""

    def __init__(self, fail_at: int = -1) -> None:
        self.fail_at = fail_at

    def document(self, index: int) -> Document:
        if index == self.fail_at:
            raise RuntimeError(f"disk on fire at document {index}")
        if index % 7 == 3:
            raise BadInput("bad_json", f"docs.jsonl:{index}", "invalid JSON")
        return Document([Segment(TEXT, chr(97 + index % 26) * (3 + index % 11))], meta={})


def _stream(workers: int, kind="thread", accum=2, source=None, prefetch=3, nice=0) -> BatchStream:
    loaders = ShardedLoaders(
        source or _Source(), _Tok(), seq_len=16, batch_size=2, grad_accum=accum, docs_per_chunk=4
    )
    return BatchStream(loaders, workers=workers, prefetch=prefetch, kind=kind, nice=nice)


def _take(stream: BatchStream, steps: int, accum: int = 2) -> list[torch.Tensor]:
    return [stream.next_batch(j).tokens_BT for _ in range(steps) for j in range(accum)]


@pytest.mark.parametrize("kind, workers", [("thread", 1), ("thread", 2), ("process", 2)])
def test_background_batches_and_state_equal_synchronous(kind, workers):
    sync, bg = _stream(0), _stream(workers, kind)
    for a, b in zip(_take(sync, 6), _take(bg, 6), strict=True):
        assert torch.equal(a, b)
    time.sleep(0.3)  # let the workers run ahead: the state must not move with them
    state = json.loads(json.dumps(bg.state_dict()))
    assert state == json.loads(json.dumps(sync.state_dict()))
    assert bg.issue_metrics() == sync.issue_metrics() and bg.issue_metrics()["data/skipped"] > 0
    resumed = _stream(workers, kind)
    resumed.load_state_dict(state)
    for a, b in zip(_take(sync, 4), _take(resumed, 4), strict=True):
        assert torch.equal(a, b)
    for s in (bg, resumed):
        s.close()


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_worker_exception_reaches_the_consumer_with_its_message(kind):
    stream = _stream(1, kind, source=_Source(fail_at=40))
    with pytest.raises(RuntimeError, match="disk on fire at document 40") as err:
        _take(stream, 50)
    assert any("data worker 0" in n and "Traceback" in n for n in err.value.__notes__)


def test_strict_bad_input_keeps_its_type_across_processes():
    loaders = ShardedLoaders(_Source(), _Tok(), seq_len=16, batch_size=2, strict=True)
    stream = BatchStream(loaders, workers=1, kind="process")
    with pytest.raises(BadInput, match="docs.jsonl:3"):
        _take(stream, 5, accum=1)


def test_killed_worker_process_is_a_clear_error():
    stream = _stream(1, "process", prefetch=1)
    stream.next_batch(0)
    os.kill(stream._procs[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"data worker 0 .*died.*exit code -9"):
        _take(stream, 20)


def test_silent_thread_death_is_a_clear_error(monkeypatch):
    from sparsefusion.data import prefetch

    monkeypatch.setattr(prefetch, "_work", lambda *args: None)
    with pytest.raises(RuntimeError, match="died without producing"):
        _stream(1).next_batch(0)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_close_does_not_hang_with_full_queues(kind):
    stream = _stream(2, kind, prefetch=1)
    stream.next_batch(0)
    time.sleep(0.3)  # both workers now block on full queues
    t0 = time.monotonic()
    stream.close()
    assert time.monotonic() - t0 < 2.0
    assert not any(p.is_alive() for p in stream._procs)


def test_auto_workers_take_a_free_core_only(monkeypatch):
    from sparsefusion.data import prefetch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_workers(0, cpu) == 0 and resolve_workers(3, cpu) == 3  # explicit values stay
    assert resolve_workers("auto", cuda) == 1
    monkeypatch.setattr(prefetch.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(prefetch.torch, "get_num_threads", lambda: 2)
    assert resolve_workers("auto", cpu) == 0  # every core runs a torch thread
    monkeypatch.setattr(prefetch.torch, "get_num_threads", lambda: 1)
    assert resolve_workers("auto", cpu) == 1


def test_worker_processes_run_at_the_asked_niceness():
    stream = _stream(1, "process", nice=7)
    try:
        stream.next_batch(0)
        (worker,) = stream._procs
        parent = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, worker.pid) == min(19, parent + 7)
    finally:
        stream.close()


def test_workers_setting_is_auto_or_a_count():
    from sparsefusion.config import ConfigError

    assert resolve_config("mot-debug", []).data.workers == "auto"
    assert resolve_config("mot-debug", ["data.workers=2"]).data.workers == 2
    with pytest.raises((ConfigError, ValueError), match="data.workers"):
        resolve_config("mot-debug", ["data.workers=many"])
    with pytest.raises((ConfigError, ValueError), match="data.workers"):
        resolve_config("mot-debug", ["data.workers=-1"])


def _args(run_dir: Path, cache: str, workers: int, kind: str = "process") -> list[str]:
    return [
        f"run.dir={run_dir}", f"tokenizer.cache_dir={cache}", "run.progress=log",
        "run.log_every=1", "run.eval_every=0", "run.save_every=2", "train.steps=6",
        "train.threads=1", "train.grad_accum=2", f"data.workers={workers}", "data.prefetch=3",
        f"data.worker_kind={kind}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def sync_rows(tmp_path_factory, tokenizer_cache) -> list[dict]:
    """The uninterrupted synchronous run every background run must reproduce."""
    run_dir = tmp_path_factory.mktemp("sync")
    train(resolve_config("mot-debug", _args(run_dir, tokenizer_cache, 0)))
    return read_metrics(run_dir / "metrics.jsonl")


def test_sigterm_with_worker_processes_saves_exits_and_resumes_exactly(
    tmp_path, tokenizer_cache, sync_rows
):
    run_dir = tmp_path / "term"
    cmd = [sys.executable, "-m", "sparsefusion", "train", "mot-debug",
           *_args(run_dir, tokenizer_cache, 2)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=dict(os.environ, **{ENV: "sigterm_at_step=3"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    kids: list[str] = []
    while proc.poll() is None:  # the worker processes, seen while the run is alive
        path = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        kids = sorted(set(kids) | set(path.read_text().split() if path.exists() else []))
        time.sleep(0.05)
    assert proc.wait(timeout=60) == 143, proc.stderr.read().decode()[-3000:]
    assert kids, "the background workers are child processes"
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{k}").exists() and "zombie" not in _state(k) for k in kids):
        assert time.monotonic() < deadline, "a data worker outlived the trainer"
        time.sleep(0.1)
    done = subprocess.run(cmd, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert losses == [r["loss"] for r in sync_rows]


def _state(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


@pytest.mark.parametrize("kind", ["process"])  # threads: same snapshots, unit-tested above
def test_sigkilled_background_run_resumes_exactly(tmp_path, tokenizer_cache, kind, sync_rows):
    run_dir = tmp_path / "bg"
    cmd = [sys.executable, "-m", "sparsefusion", "train", "mot-debug",
           *_args(run_dir, tokenizer_cache, 2, kind)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=dict(os.environ, **{ENV: "pause_at_step=3"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run_dir / "fault_pause_at_step").exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline, "the fault point was never reached"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    rows = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r}
    ref = {r["step"]: r for r in sync_rows if "split" not in r}
    assert sorted(rows) == sorted(ref) == list(range(1, 7))
    for step in ref:
        for key in ("loss", "tokens", "flops", "grad_norm"):
            assert rows[step][key] == ref[step][key], (step, key)


def test_resume_may_change_the_loading_settings(tmp_path, tokenizer_cache, sync_rows):
    run_dir = tmp_path / "switch"
    train(resolve_config("mot-debug", [*_args(run_dir, tokenizer_cache, 0), "train.stop_at=3"]))
    train(resolve_config("mot-debug", _args(run_dir, tokenizer_cache, 1, "thread")))
    a = [r["loss"] for r in sync_rows]
    b = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert len(a) == 7 and a == b  # 6 train rows + val


@pytest.mark.gpu
def test_batches_arrive_pinned_on_cuda():
    for kind in ("thread", "process"):
        loaders = ShardedLoaders(_Source(), _Tok(), seq_len=16, batch_size=2)
        stream = BatchStream(loaders, workers=1, kind=kind, pin_memory=True)
        assert stream.next_batch(0).tokens_BT.is_pinned()
        stream.close()
