"""The benchmark's naive MoT computes what the model computes; the CPU smoke run works."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from sparsefusion.bench.naive_mot import NaiveMoT
from sparsefusion.bench.step import BenchSettings, synthetic_batch
from sparsefusion.models.transformer import ModelConfig, Transformer


def test_naive_mot_equals_the_plan_path():
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="mot", dim=32, num_layers=2, num_heads=4, vocab_size=64, untie_norms=True, qk_norm=True
    )
    model = Transformer(cfg)
    model.init_weights()
    s = BenchSettings(archs=["mot"], seq_len=96, batch_size=2, vocab_size=64)
    batch = synthetic_batch(s)
    assert 0.2 < batch.modality_BT.float().mean() < 0.8
    inputs = batch.model_inputs(cfg.tower_of_modality, cfg.num_towers)
    assert not inputs.plan.is_identity
    fast = model(inputs).logits_BTV
    naive = NaiveMoT(model)(inputs).logits_BTV
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-5)


def test_bench_cli_smoke(tmp_path: Path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "sparsefusion",
        "bench",
        "--archs",
        "dense,mot,naive-mot,moma-4t4i,moma-4t4i-mod",
        "--size",
        "debug",
        "--seq-len",
        "64",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--rounds",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["arch"] for r in rows] == ["dense", "mot", "naive-mot", "moma-4t4i", "moma-4t4i-mod"]
    assert rows[0]["throughput_vs_first"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["train_flops"] > 0 for r in rows)
    assert all(r["timed_steps"] == 2 for r in rows)  # one step in each of the two rounds
    assert "| mot |" in proc.stdout


def test_bench_settings_are_checked():
    import pytest

    with pytest.raises(ValueError, match="rounds"):
        BenchSettings(archs=["dense"], rounds=0)


def test_rows_are_written_as_they_finish(tmp_path: Path, monkeypatch):
    """A run cut off after its first row (a lease's time limit) still leaves that row."""
    import pytest

    from sparsefusion.bench import step

    real = step.bench_row

    def cut_off_after_dense(arch, s, device):
        if arch != "dense":
            raise KeyboardInterrupt  # what a SIGINT from `timeout` looks like in Python
        return real(arch, s, device)

    monkeypatch.setattr(step, "bench_row", cut_off_after_dense)
    out = tmp_path / "bench.json"
    s = BenchSettings(archs=["dense", "mot"], size="debug", seq_len=32, batch_size=1,
                      steps=1, warmup=1, device="cpu")  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        step.run_bench(s, out=out)
    got = json.loads(out.read_text())
    assert [r["arch"] for r in got["rows"]] == ["dense"] and got["meta"]["complete"] is False
    assert not list(tmp_path.glob("*.tmp"))
