"""DCP checkpoints: round trip, full disk, and no unpickling beyond DCP's metadata classes."""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from sparsefusion.checkpoint import dcp as dist_ckpt
from sparsefusion.checkpoint.dcp import (
    SafeFileSystemReader,
    is_dcp_checkpoint,
    load_dcp_checkpoint,
    safe_load_metadata,
    save_dcp_checkpoint,
)
from sparsefusion.checkpoint.store import CheckpointError, checkpoint_dir, latest_checkpoint
from sparsefusion.distributed.mesh import DistEnv


def _save(path: Path, state: dict) -> None:
    dcp.save(state, checkpoint_id=str(path), no_dist=True)


def test_metadata_of_a_tensor_checkpoint_loads(tmp_path: Path):
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "optim": {"step": torch.tensor(3.0)}}
    _save(tmp_path / "dcp", state)
    target = {"model": {"w": torch.zeros(2, 3)}, "optim": {"step": torch.tensor(0.0)}}
    dcp.load(target, storage_reader=SafeFileSystemReader(tmp_path / "dcp"), no_dist=True)
    assert torch.equal(target["model"]["w"], state["model"]["w"])
    assert is_dcp_checkpoint(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_metadata_with_foreign_globals_is_refused(tmp_path: Path):
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        safe_load_metadata(pickle.dumps(_Evil()))
    _save(tmp_path / "dcp", {"w": torch.ones(2)})
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    (tmp_path / "state.json").write_text(json.dumps({"param_groups": [], "num_data_shards": 1}))
    with pytest.raises(CheckpointError, match="unsafe or corrupt") as e:
        load_dcp_checkpoint(tmp_path, torch.nn.Linear(2, 1), None, DistEnv())
    assert "refusing to load posix.system" in str(e.value)


def test_pickled_values_in_a_checkpoint_are_refused(tmp_path: Path):
    _save(tmp_path / "dcp", {"w": torch.ones(2), "note": {"lr": 0.1}})  # a float is pickled
    with pytest.raises(pickle.UnpicklingError, match="refusing to load .*BytesStorageMetadata"):
        safe_load_metadata((tmp_path / "dcp" / ".metadata").read_bytes())


def _model_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


DATA = {"num_shards": 1, "shards": {"0": {"docs_read": 5}}}


def test_dcp_save_load_round_trip_in_one_process(tmp_path: Path):
    model, opt = _model_opt()
    path = save_dcp_checkpoint(tmp_path, 3, model, opt, {"tokens": 7}, DATA, DistEnv())
    model2, opt2 = _model_opt()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    state = load_dcp_checkpoint(path, model2, opt2, DistEnv())
    assert state["step"] == 3 and state["tokens"] == 7 and state["loader"] == DATA
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_dcp_full_disk_names_the_path_and_keeps_previous(tmp_path: Path, monkeypatch):
    model, opt = _model_opt()
    save_dcp_checkpoint(tmp_path, 1, model, opt, {}, DATA, DistEnv())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dist_ckpt, "save_file", full)
    with pytest.raises(CheckpointError, match="disk full") as e:
        save_dcp_checkpoint(tmp_path, 2, model, opt, {}, DATA, DistEnv())
    assert "step_00000002" in str(e.value)
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert not list(checkpoint_dir(tmp_path).glob(".tmp*"))


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_a_dcp_checkpoint_with_non_finite_values_is_refused_by_name(tmp_path, with_optimizer):
    """Validation reads no DCP tensor; the load checks every value it reads, so NaN weights or
    moments never reach a resumed run (weights only: eval, export, generate)."""
    model, opt = _model_opt()
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    path = save_dcp_checkpoint(tmp_path, 3, model, opt, {}, DATA, DistEnv())
    model2, opt2 = _model_opt()
    with pytest.raises(CheckpointError, match=r"model\.1\.bias holds non-finite") as e:
        load_dcp_checkpoint(path, model2, opt2 if with_optimizer else None, DistEnv())
    assert f"damaged_{path.name}" in str(e.value)
    model, opt = _model_opt()
    opt.state[model[0].weight]["exp_avg"][0, 0] = float("inf")
    path = save_dcp_checkpoint(tmp_path, 4, model, opt, {}, DATA, DistEnv())
    if with_optimizer:
        with pytest.raises(CheckpointError, match=r"optim\..*exp_avg holds non-finite"):
            load_dcp_checkpoint(path, model2, opt2, DistEnv())
    else:  # the weights are whole: eval and generate may use them
        load_dcp_checkpoint(path, model2, None, DistEnv())
