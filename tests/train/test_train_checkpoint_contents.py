"""Checkpoint contents validated by schema (issue 28, items 5 and 6): a checkpoint whose files
parse but whose contents are wrong is damaged, so resume and every reader fall back to the newest
valid one; a run folder with metrics but no checkpoint is refused, never restarted over."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsefusion.checkpoint import store as ck
from sparsefusion.checkpoint.weights import pick_checkpoint
from sparsefusion.models.transformer import Transformer
from sparsefusion.runs.export import export_run
from sparsefusion.runs.folder import read_metrics, run_config
from sparsefusion.runs.presets import resolve_config
from sparsefusion.train.trainer import train

COMMON = ("run.progress=log", "run.log_every=1", "run.eval_every=0", "run.save_every=2",
          "train.steps=7", "train.threads=1", "run.tensorboard=false")  # fmt: skip


def _cfg(run_dir: Path, cache: str, *extra: str):
    return resolve_config(
        "mot-debug", [f"run.dir={run_dir}", f"tokenizer.cache_dir={cache}", *COMMON, *extra]
    )


def _rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r}


@pytest.fixture(scope="module")
def stopped_at_6(tmp_path_factory, tokenizer_cache) -> Path:
    """A run stopped after step 6: checkpoints step_4 and step_6, metrics rows 1..6."""
    run_dir = tmp_path_factory.mktemp("stopped")
    train(_cfg(run_dir, tokenizer_cache, "train.stop_at=6"))
    return run_dir


def _edit_tensors(file: Path, edit) -> None:
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def _edit_state(folder: Path, edit, *, reseal: bool = True) -> None:
    """Edit ``state.json``; ``reseal`` records the new contents' own digest, so the schema check
    (what older checkpoints, which have no such digest, rely on) is what must catch the edit."""
    state = json.loads((folder / "state.json").read_text())
    edit(state)
    (folder / "state.json").write_text(ck.state_json(state) if reseal else json.dumps(state))


def _first_matrix(tensors: dict) -> str:
    return next(k for k, v in sorted(tensors.items()) if v.ndim == 2)


def _nan(tensors):
    tensors[_first_matrix(tensors)][0, 0] = float("nan")


def _to_double(tensors):
    name = _first_matrix(tensors)
    tensors[name] = tensors[name].double()


def _moment_shape(tensors):
    name = next(k for k in sorted(tensors) if k.endswith(".exp_avg"))
    tensors[name] = tensors[name].flatten()[:-1].clone()


def _moment_nan(tensors):
    name = next(k for k in sorted(tensors) if k.endswith(".exp_avg_sq"))
    tensors[name] = tensors[name].clone().fill_(float("inf"))


def _shard(state) -> dict:
    return state["loader"]["shards"]["0"]


# Each damage leaves every file parseable (issue 28 item 5 and the corrupt-content minor items).
CONTENT_DAMAGE = {
    "optim-extra-key": ("optim", lambda t: t.update({"optim.x.y": torch.zeros(2)}), "optim.x.y"),
    "rng-wrong-size": ("optim", lambda t: t.update({"rng.cpu": t["rng.cpu"][:100]}), "rng.cpu"),
    "moment-wrong-shape": ("optim", _moment_shape, "exp_avg"),
    "moment-inf": ("optim", _moment_nan, "non-finite"),
    "weight-nan": ("model", _nan, "non-finite"),
    "weight-dtype": ("model", _to_double, "float64"),
    "float-step": ("state", lambda s: s.update(step=6.0), "step"),
    "string-counter": ("state", lambda s: _shard(s).update(docs_read="64"), "docs_read"),
    "float-counter": ("state", lambda s: _shard(s).update(tokens_emitted=1.5), "tokens_emitted"),
    "negative-tokens": ("state", lambda s: s.update(tokens=-1), "tokens"),
    "nan-flops": ("state", lambda s: s.update(flops=float("nan")), "flops"),
    "extra-state-key": ("state", lambda s: s.update(surprise=1), "surprise"),
    "param-group-index": ("state", lambda s: s["param_groups"][0]["params"].append(99), "param"),
    "buffer-lengths": ("state", lambda s: _shard(s)["buffer"]["ids"].append(3), "buffer"),
    # well-formed but not what was saved: an out-of-range token id (CI's fuzz found a flipped
    # digit reaching the embedding); only the state's own digest can tell
    "buffer-token-id": (
        "state-unsealed",
        lambda s: _shard(s)["buffer"]["ids"].__setitem__(0, 10**6),
        "SHA-256",
    ),
}


def _damage(folder: Path, kind: str) -> str:
    where, edit, word = CONTENT_DAMAGE[kind]
    if where.startswith("state"):
        _edit_state(folder, edit, reseal=where == "state")
    else:
        _edit_tensors(folder / f"{where}.safetensors", edit)
    return word


@pytest.mark.parametrize("kind", sorted(CONTENT_DAMAGE))
def test_corrupt_contents_fall_back_and_are_quarantined(
    tmp_path, tokenizer_cache, stopped_at_6, kind, caplog
):
    run_dir = shutil.copytree(stopped_at_6, tmp_path / "run")
    newest = ck.checkpoint_dir(run_dir) / "step_00000006"
    word = _damage(newest, kind)
    with caplog.at_level(logging.WARNING, logger="sparsefusion"):
        train(_cfg(run_dir, tokenizer_cache))
    warning = re.search(
        r"step_00000006 is damaged \((.*)\); resuming from step_00000004", caplog.text
    )
    assert warning and word in warning[1], caplog.text
    assert sorted(_rows(run_dir)) == list(range(1, 8))
    assert (ck.checkpoint_dir(run_dir) / "damaged_step_00000006").is_dir()
    # The run went on from step 4 and saved steps 6 and 7 afresh: both valid now.
    model = Transformer(run_config(run_dir).model)
    assert pick_checkpoint(run_dir, model).name == "step_00000007"


@pytest.mark.parametrize("kind", ["optim-extra-key", "weight-nan", "float-step", "rng-wrong-size"])
def test_readers_fall_back_from_corrupt_contents(tmp_path, stopped_at_6, kind, caplog):
    """eval, export, generate and serve choose through pick_checkpoint: the same fallback."""
    run_dir = shutil.copytree(stopped_at_6, tmp_path / "run")
    newest = ck.checkpoint_dir(run_dir) / "step_00000006"
    _damage(newest, kind)
    model = Transformer(run_config(run_dir).model)
    with caplog.at_level(logging.WARNING, logger="sparsefusion"):
        assert pick_checkpoint(run_dir, model).name == "step_00000004"
    assert "step_00000006 is damaged" in caplog.text
    with pytest.raises(ck.CheckpointError, match="checkpoint 6: .* is damaged"):
        pick_checkpoint(run_dir, model, step=6)
    out = export_run(run_dir, tmp_path / "export")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["checkpoint"] == "step_00000004"
    assert newest.is_dir()  # readers move nothing


def test_fifo_state_json_does_not_hang(tmp_path, tokenizer_cache, stopped_at_6, caplog):
    run_dir = shutil.copytree(stopped_at_6, tmp_path / "run")
    state = ck.checkpoint_dir(run_dir) / "step_00000006" / "state.json"
    state.unlink()
    os.mkfifo(state)
    model = Transformer(run_config(run_dir).model)

    class Hung(BaseException):  # not an OSError: no reader may swallow it
        pass

    def hung(*_):
        raise Hung("reading the FIFO state.json blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        with caplog.at_level(logging.WARNING, logger="sparsefusion"):
            assert pick_checkpoint(run_dir, model).name == "step_00000004"
            train(_cfg(run_dir, tokenizer_cache))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert "state.json is not a regular file" in caplog.text
    assert sorted(_rows(run_dir)) == list(range(1, 8))


@pytest.mark.parametrize("gone", ["deleted", "all-damaged"])
def test_metrics_without_checkpoints_are_refused(tmp_path, tokenizer_cache, stopped_at_6, gone):
    """Issue 28 item 6: no silent restart at step 0 over the run's history."""
    run_dir = shutil.copytree(stopped_at_6, tmp_path / "run")
    if gone == "deleted":
        shutil.rmtree(ck.checkpoint_dir(run_dir))
    else:
        for folder in ck.checkpoint_dir(run_dir).iterdir():
            _damage(folder, "weight-nan")
    before = (run_dir / "metrics.jsonl").read_bytes()
    config = (run_dir / "config.yaml").read_bytes()
    error = ValueError if gone == "deleted" else ck.CheckpointError
    with pytest.raises(error) as e:
        train(_cfg(run_dir, tokenizer_cache))
    message = str(e.value)
    assert "\n" not in message and "another run.dir" in message
    if gone == "deleted":
        assert "up to step 6" in message and "delete the folder" in message
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    assert (run_dir / "config.yaml").read_bytes() == config
