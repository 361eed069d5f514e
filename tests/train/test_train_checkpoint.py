"""Checkpoints: round trip, atomic writes, pruning, the learning-rate schedule."""

from pathlib import Path

import pytest
import torch

from sparsefusion.checkpoint import store as ck
from sparsefusion.train.optim import OptimConfig, build_optimizer, lr_at


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_model_optimizer_and_rng(tmp_path: Path):
    model, opt = _model_and_opt()
    torch.manual_seed(123)
    ck.save_checkpoint(tmp_path, 5, model, opt, {"tokens": 10, "loader": {"k": [1, 2]}})
    expected_draw = torch.rand(3)
    model2, opt2 = _model_and_opt()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    state = ck.load_checkpoint(ck.latest_checkpoint(tmp_path), model2, opt2)
    assert state["step"] == 5 and state["loader"] == {"k": [1, 2]}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], opt2.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k])
    assert torch.equal(torch.rand(3), expected_draw)


def test_incomplete_save_leaves_previous_checkpoint(tmp_path: Path, monkeypatch):
    model, opt = _model_and_opt()
    ck.save_checkpoint(tmp_path, 1, model, opt, {})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken)
    with pytest.raises(ck.CheckpointError, match="disk full"):
        ck.save_checkpoint(tmp_path, 2, model, opt, {})
    assert ck.latest_checkpoint(tmp_path).name == "step_00000001"
    assert not list(ck.checkpoint_dir(tmp_path).glob(".tmp*"))


def test_keep_last_k(tmp_path: Path):
    model, opt = _model_and_opt()
    for step in range(1, 5):
        ck.save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    names = sorted(p.name for p in ck.checkpoint_dir(tmp_path).iterdir())
    assert names == ["step_00000003", "step_00000004"]


def test_mismatched_model_is_a_clear_error(tmp_path: Path):
    model, opt = _model_and_opt()
    ck.save_checkpoint(tmp_path, 1, model, opt, {})
    other = torch.nn.Linear(4, 2)
    with pytest.raises(ck.CheckpointError, match="does not match"):
        ck.load_checkpoint(ck.latest_checkpoint(tmp_path), other, None)


def test_schedule_warmup_then_decay():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="linear", min_lr_ratio=0.1)
    assert lr_at(5, 100, cfg) == pytest.approx(0.5)
    assert lr_at(10, 100, cfg) == pytest.approx(1.0)
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)
    cos = OptimConfig(lr=1.0, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0)
    assert lr_at(50, 100, cos) == pytest.approx(0.5)
