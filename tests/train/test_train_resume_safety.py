"""Damaged checkpoints: validated before they are trusted; the newest valid one is resumed from
(exactly), another architecture is an error, and a run with no usable checkpoint is refused
without touching its metrics or checkpoints."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsefusion.checkpoint import store as ck
from sparsefusion.runs.export import export_run
from sparsefusion.runs.folder import read_metrics
from sparsefusion.runs.presets import resolve_config
from sparsefusion.train.trainer import train

COMMON = (
    "run.progress=log",
    "run.log_every=1",
    "run.eval_every=0",
    "run.save_every=2",
    "train.steps=7",
    "train.threads=1",
)


def _cfg(run_dir: Path, cache: str, *extra: str):
    return resolve_config(
        "mot-debug", [f"run.dir={run_dir}", f"tokenizer.cache_dir={cache}", *COMMON, *extra]
    )


def _rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer_cache) -> dict[int, dict]:
    run_dir = tmp_path_factory.mktemp("straight")
    train(_cfg(run_dir, tokenizer_cache))
    return _rows(run_dir)


@pytest.fixture(scope="module")
def stopped_at_6(tmp_path_factory, tokenizer_cache) -> Path:
    """A run stopped after step 6: checkpoints step_4 and step_6, metrics rows 1..6."""
    run_dir = tmp_path_factory.mktemp("stopped")
    train(_cfg(run_dir, tokenizer_cache, "train.stop_at=6"))
    return run_dir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated-model": lambda c: _truncate(c / "model.safetensors"),
    "truncated-optim": lambda c: _truncate(c / "optim.safetensors"),
    "wrong-state-json": lambda c: (c / "state.json").write_text(json.dumps({"step": 6})),
    "missing-model": lambda c: (c / "model.safetensors").unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(
    tmp_path, tokenizer_cache, uninterrupted, stopped_at_6, damage, caplog
):
    run_dir = _copy(stopped_at_6, tmp_path / "run")
    DAMAGE[damage](ck.checkpoint_dir(run_dir) / "step_00000006")
    with caplog.at_level(logging.WARNING, logger="sparsefusion"):
        train(_cfg(run_dir, tokenizer_cache))
    assert re.search("step_00000006 is damaged.*resuming from step_00000004", caplog.text)
    rows = _rows(run_dir)
    assert sorted(rows) == list(range(1, 8))
    for step in rows:
        for key in ("loss", "loss/text", "loss/image", "tokens", "flops", "lr", "grad_norm"):
            assert rows[step][key] == uninterrupted[step][key], (step, key)
    # The damaged folder is kept aside (never deleted, never loaded again).
    assert (ck.checkpoint_dir(run_dir) / "damaged_step_00000006").is_dir()
    assert "moved the damaged checkpoint" in (run_dir / "train.log").read_text()


def test_checkpoint_of_another_architecture_is_an_error(tmp_path, tokenizer_cache, stopped_at_6):
    run_dir = _copy(stopped_at_6, tmp_path / "run")
    file = ck.checkpoint_dir(run_dir) / "step_00000006" / "model.safetensors"
    weights = load_file(str(file))
    name = next(k for k, v in weights.items() if v.ndim == 2)
    weights[name] = torch.zeros(weights[name].shape[0] + 1, weights[name].shape[1])
    save_file(weights, str(file))
    state = json.loads((file.parent / "state.json").read_text())  # saved so: digest matches
    state["digests"]["model.safetensors"] = ck.file_digest(file)
    (file.parent / "state.json").write_text(ck.state_json(state))
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ck.CheckpointError, match=f"does not match the model.*{name}"):
        train(_cfg(run_dir, tokenizer_cache))
    assert (run_dir / "metrics.jsonl").read_text() == before
    with pytest.raises(ck.CheckpointError, match="does not match the model"):
        export_run(run_dir, tmp_path / "export")


def test_no_usable_checkpoint_refuses_and_changes_nothing(tmp_path, tokenizer_cache, stopped_at_6):
    run_dir = _copy(stopped_at_6, tmp_path / "run")
    for folder in ck.checkpoint_dir(run_dir).iterdir():
        (folder / "state.json").unlink()
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ck.CheckpointError, match="none can be resumed from.*state.json is missing"):
        train(_cfg(run_dir, tokenizer_cache))
    assert (run_dir / "metrics.jsonl").read_text() == before
    names = sorted(p.name for p in ck.checkpoint_dir(run_dir).iterdir())
    assert names == ["step_00000004", "step_00000006"]


def test_export_skips_a_damaged_newest_checkpoint(tmp_path, stopped_at_6, caplog):
    run_dir = _copy(stopped_at_6, tmp_path / "run")
    _truncate(ck.checkpoint_dir(run_dir) / "step_00000006" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="sparsefusion"):
        out = export_run(run_dir, tmp_path / "export")
    assert "step_00000006 is damaged" in caplog.text
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["checkpoint"] == "step_00000004"
    assert (ck.checkpoint_dir(run_dir) / "step_00000006").is_dir()  # export changes nothing


def test_sharded_dcp_checkpoints_are_validated_too(tmp_path, caplog):
    from sparsefusion.checkpoint.dcp import save_dcp_checkpoint
    from sparsefusion.checkpoint.resume import select_checkpoint
    from sparsefusion.distributed.mesh import DistEnv

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    buffer = {"ids": [], "modality": [], "position": [], "document": []}
    shard = {"version": 1, "rank": 0, "world_size": 1, "docs_read": 5, "buffer": buffer,
             "tokens_emitted": 0, "modality_tokens": {}}  # fmt: skip
    data = {"num_shards": 1, "shards": {"0": shard}}
    for step in (2, 4):
        counters = {"tokens": step, "flops": 0.0}
        save_dcp_checkpoint(tmp_path, step, model, opt, counters, data, DistEnv(), keep=3)
    assert select_checkpoint(tmp_path, model)[0].name == "step_00000004"
    newest = ck.checkpoint_dir(tmp_path) / "step_00000004"
    _truncate(next((newest / "dcp").glob("*.distcp")))
    with caplog.at_level(logging.WARNING, logger="sparsefusion"):
        chosen, damaged = select_checkpoint(tmp_path, model)
    assert re.search(r"step_00000004 is damaged \(dcp/.*truncated", caplog.text)
    assert chosen.name == "step_00000002" and damaged == [newest]
    other = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Linear(9, 2))
    with pytest.raises(ck.CheckpointError, match="does not match the model.*0.weight"):
        select_checkpoint(tmp_path, other)


def test_run_of_an_older_version_without_the_new_keys_resumes(
    tmp_path, tokenizer_cache, stopped_at_6
):
    import yaml

    run_dir = _copy(stopped_at_6, tmp_path / "run")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key in ("max_doc_bytes", "max_file_bytes", "max_image_pixels", "max_audio_seconds"):
        del config["data"][key]  # written before these keys existed
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    train(_cfg(run_dir, tokenizer_cache))
    assert max(_rows(run_dir)) == 7
