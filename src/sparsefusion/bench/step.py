"""Steady-state training-step benchmark: every architecture side by side in one process.

Each row builds a model from a training preset's model config (or ``naive-mot``: the MoT weights
run the boolean-mask way), feeds the same synthetic packed batch (documents of mixed text and
image spans), runs ``warmup`` steps, then times ``steps`` steps of forward + backward + the
training AdamW (``train/optim.py``) and reports the median. Ratios are to the first row (dense
by default), measured in the same run.
With ``rounds`` > 1 every model stays alive and the rows are timed in turn, ``steps`` steps each
per round, so that a slow spell of a shared machine hits every row alike (the median is over all
rounds). With ``compile`` the row also reports the graph breaks dynamo met (0 is the goal).

MFU (GPU only) = training FLOPs per step (``models.flops.train_flops``: 6 x active matmul
parameters x tokens + 12 x layers x heads x head_dim x attended pairs) / step time / peak dense
bf16 FLOP/s of the device (H100/H200 SXM: 989 TFLOP/s).

Shape legend: B = rows, T = sequence length.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sparsefusion.bench.naive_mot import NaiveMoT
from sparsefusion.data.batch import Batch
from sparsefusion.models.flops import train_flops
from sparsefusion.models.presets import model_size
from sparsefusion.models.transformer import ModelConfig, Transformer
from sparsefusion.objectives.base import ObjectiveConfig, build_objective
from sparsefusion.objectives.forward import forward_loss
from sparsefusion.runtime.host_malloc import apply_host_malloc
from sparsefusion.train.optim import OptimConfig, build_optimizer

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass(kw_only=True)
class BenchSettings:
    """What to measure.

    Attributes:
        archs: row names: training presets (``dense``, ``mot``, ...) or ``naive-mot``.
        size: model size name (models/presets.py).
        seq_len: tokens per row.
        batch_size: rows per step.
        image_frac: fraction of positions inside image spans.
        steps: timed steps (the median is reported).
        warmup: untimed steps first (compilation happens here).
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32`` or ``bf16``.
        compile: ``torch.compile`` each block.
        rounds: timing rounds over all rows (> 1 interleaves the rows; all models stay alive).
        vocab_size: vocabulary of the synthetic batch.
        host_malloc: ``reuse`` or ``system``, as ``train.host_malloc`` (process-wide).
    """

    archs: list[str]
    size: str = "tiny"
    seq_len: int = 512
    batch_size: int = 8
    image_frac: float = 0.5
    steps: int = 10
    warmup: int = 3
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    rounds: int = 1
    vocab_size: int = 4096
    host_malloc: str = "reuse"

    def __post_init__(self) -> None:
        if not self.archs:
            raise ValueError("bench needs at least one arch")
        if self.steps < 1 or self.warmup < 0 or self.rounds < 1:
            raise ValueError("bench needs steps >= 1, warmup >= 0 and rounds >= 1")


def synthetic_batch(s: BenchSettings, *, seed: int = 0) -> Batch:
    """Packed rows of documents (about 4 per row) mixing text runs and 64-token image spans."""
    g = torch.Generator().manual_seed(seed)
    B, T = s.batch_size, s.seq_len
    tokens_BT = torch.randint(0, s.vocab_size, (B, T), generator=g)
    modality_BT = torch.zeros(B, T, dtype=torch.long)
    span = 64
    for b in range(B):
        t = 0
        while t < T:
            text_len = int(span * (1 - s.image_frac) / max(s.image_frac, 1e-6)) + 1
            t += int(torch.randint(text_len // 2 + 1, 2 * text_len + 1, (1,), generator=g))
            modality_BT[b, t : t + span] = 1
            t += span
    doc_len = max(1, T // 4)
    document_BT = (torch.arange(T) // doc_len).expand(B, T).contiguous()
    position_BT = (torch.arange(T) % doc_len).expand(B, T).contiguous()
    return Batch(
        tokens_BT=tokens_BT,
        targets_BT=torch.roll(tokens_BT, -1, dims=1),
        modality_BT=modality_BT,
        target_modality_BT=torch.roll(modality_BT, -1, dims=1),
        position_BT=position_BT,
        document_BT=document_BT,
    )


def model_config(arch: str, s: BenchSettings) -> ModelConfig:
    """The model config of a bench row: a training preset's model at the bench size."""
    from sparsefusion.runs.presets import resolve_config

    preset = "mot" if arch == "naive-mot" else arch
    cfg = resolve_config(preset, []).model
    size = model_size(s.size)
    # Presets that restore compute with extra layers (MoD) keep their ratio to the dense depth.
    dense_layers = resolve_config("dense", []).model.num_layers
    size["num_layers"] = max(1, round(cfg.num_layers * size["num_layers"] / dense_layers))
    return replace(cfg, **size, vocab_size=s.vocab_size, max_seq_len=s.seq_len)


@dataclass
class _Row:
    """A row being measured: its model, optimiser and step closure, and its step times."""

    arch: str
    cfg: ModelConfig
    model: Transformer
    opt: torch.optim.Optimizer
    step: Any
    document_BT: torch.Tensor
    tower_counts: tuple[int, ...]
    times: list[float]
    graph_breaks: int | None = None


def _setup_row(arch: str, s: BenchSettings, device: torch.device) -> _Row:
    torch.manual_seed(0)
    cfg = model_config(arch, s)
    model = Transformer(cfg)
    model.init_weights()
    model.to(device)
    if s.compile:
        for layer in model.layers:
            layer.compile()
    runner = NaiveMoT(model) if arch == "naive-mot" else model
    opt = build_optimizer(model, OptimConfig(lr=1e-4))  # the training optimizer (fused AdamW)
    batch = synthetic_batch(s)
    objective = build_objective(ObjectiveConfig(z_loss=0.0), cfg)

    def step() -> torch.Tensor:
        return forward_loss(runner, batch, objective, device=device).loss()

    counts = objective.prepare(batch).plan.counts
    return _Row(arch, cfg, model, opt, step, batch.document_BT, counts, [])


def _run_steps(row: _Row, n: int, s: BenchSettings, device: torch.device, *, timed: bool) -> None:
    bf16 = s.precision == "bf16" or (s.precision == "auto" and device.type == "cuda")
    for _ in range(n):
        t0 = _now(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = row.step()
        loss.backward()
        row.opt.step()
        row.opt.zero_grad(set_to_none=True)
        if timed:
            row.times.append(_now(device) - t0)


def _warm_up(row: _Row, s: BenchSettings, device: torch.device) -> None:
    """Untimed steps (compilation happens here); counts dynamo's graph breaks when compiling."""
    from torch._dynamo.utils import counters

    counters.clear()
    _run_steps(row, s.warmup, s, device, timed=False)
    if s.compile:
        row.graph_breaks = sum(counters["graph_break"].values())


def _result(row: _Row, s: BenchSettings, device: torch.device, *, own_peak: bool) -> dict[str, Any]:
    """The row's numbers; ``own_peak``: the CUDA memory peak is the row's own (not interleaved)."""
    step_s = statistics.median(row.times)
    flops = train_flops(row.cfg, row.document_BT.cpu(), tower_counts=row.tower_counts)
    tokens = s.batch_size * s.seq_len
    out = {"arch": row.arch, "step_s": step_s, "tokens_per_s": tokens / step_s}
    out.update(train_flops=flops, params=sum(p.numel() for p in row.model.parameters()))
    out["timed_steps"] = len(row.times)
    if row.graph_breaks is not None:
        out["graph_breaks"] = row.graph_breaks
    if device.type == "cuda":
        if own_peak:
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        peak = _peak_flops(device)
        out["mfu"] = flops / step_s / peak if peak else None
    return out


def bench_row(arch: str, s: BenchSettings, device: torch.device) -> dict[str, Any]:
    """Time one architecture alone (all its rounds back to back); returns its row."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = _setup_row(arch, s, device)
    _warm_up(row, s, device)
    _run_steps(row, s.steps * s.rounds, s, device, timed=True)
    return _result(row, s, device, own_peak=True)


def _bench_interleaved(s: BenchSettings, device: torch.device) -> list[dict[str, Any]]:
    rows = [_setup_row(arch, s, device) for arch in s.archs]
    for row in rows:
        _warm_up(row, s, device)
    for _ in range(s.rounds):
        for row in rows:
            _run_steps(row, s.steps, s, device, timed=True)
    return [_result(row, s, device, own_peak=False) for row in rows]


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def run_bench(s: BenchSettings, *, out: Path | None = None) -> list[dict[str, Any]]:
    """Benchmark every row, add ratios to the first row, print a table, write JSON.

    Rows timed one after the other (``rounds == 1``) are written to ``out`` as each finishes,
    so a run that is cut off (a GPU lease's time limit) still leaves every row it reached.
    """
    device = torch.device(
        "cuda"
        if s.device == "auto" and torch.cuda.is_available()
        else ("cpu" if s.device == "auto" else s.device)
    )
    apply_host_malloc(s.host_malloc)
    rows: list[dict[str, Any]] = []
    if s.rounds > 1:
        rows = _bench_interleaved(s, device)
    else:
        for arch in s.archs:
            rows.append(bench_row(arch, s, device))
            _write_rows(out, rows, s, device)
    _write_rows(out, rows, s, device)
    print(format_table(rows, s, device))
    return rows


def _write_rows(
    out: Path | None, rows: list[dict[str, Any]], s: BenchSettings, device: torch.device
) -> None:
    """Add the ratios to the first row and write the rows atomically (nothing when no ``out``)."""
    for row in rows:
        row["throughput_vs_first"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["step_time_vs_first"] = row["step_s"] / rows[0]["step_s"]
    if out is None:
        return
    meta = {"settings": asdict(s), "device": _device_name(device), "torch": torch.__version__,
            "complete": len(rows) == len(s.archs)}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    tmp.replace(out)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def format_table(rows: list[dict[str, Any]], s: BenchSettings, device: torch.device) -> str:
    """A Markdown table of the rows."""
    head = (
        f"size={s.size} seq={s.seq_len} batch={s.batch_size} device={_device_name(device)} "
        f"compile={s.compile} rounds={s.rounds} steps={s.steps} host_malloc={s.host_malloc}\n"
    )
    lines = [
        "| arch | step (ms) | tokens/s | vs first (throughput) | MFU | peak mem (GB) "
        "| graph breaks |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        mem = f"{r['peak_mem_gb']:.1f}" if "peak_mem_gb" in r else "-"
        lines.append(
            f"| {r['arch']} | {1000 * r['step_s']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['throughput_vs_first']:.3f}x | {mfu} | {mem} | {r.get('graph_breaks', '-')} |"
        )
    return head + "\n".join(lines)
