"""Where a demo training step's time goes: data, host bookkeeping (routing plan and FLOPs
count), forward (with the loss), backward, optimizer (gradient clip, AdamW step) and logging.

The phases are the pieces of ``train/step.py``'s ``forward_loss`` and the trainer's loop, in
their order, with a clock between them, on the synchronous loader (the ``data`` phase is what
background loading takes off the step). Dense and MoT, with each AdamW implementation asked
for, take one step each in turn.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from sparsefusion.data.shards import ShardedLoaders
from sparsefusion.data.sources import build_source
from sparsefusion.distributed.mesh import DistEnv
from sparsefusion.models.flops import train_flops
from sparsefusion.models.transformer import Transformer
from sparsefusion.objectives.base import build_objective
from sparsefusion.objectives.forward import StepOutput
from sparsefusion.runs.presets import resolve_config
from sparsefusion.runs.tokenizer import finalize_config
from sparsefusion.runtime.device import autocast_context
from sparsefusion.runtime.host_malloc import apply_host_malloc
from sparsefusion.tokenizers.build import load_or_train_tokenizer
from sparsefusion.train.guards import clip_gradients
from sparsefusion.train.metrics import LogWindow
from sparsefusion.train.optim import build_optimizer
from sparsefusion.train.step import global_counts

PHASES = ("data", "plan_flops", "forward", "backward", "optimizer", "logging")


@dataclass
class _Setup:
    cfg: Any
    model: Transformer
    optimizer: torch.optim.Optimizer
    loaders: ShardedLoaders
    objective: Any
    window: LogWindow
    step: int
    tokens: int
    times: dict[str, list[float]]


def _setup(preset: str, impl: str, args: Any) -> _Setup:
    threads = getattr(args, "train_threads", 1)
    over = [f"tokenizer.cache_dir={args.cache}", f"train.threads={threads}", f"optim.impl={impl}"]
    cfg = resolve_config(preset, over)
    source = build_source(cfg.data, seed=cfg.seed, split="train")
    tok = load_or_train_tokenizer(
        cfg.tokenizer, build_source(cfg.data, seed=0, split="train"), progress=False,
        log=lambda m: None,
    )  # fmt: skip
    cfg = finalize_config(cfg, tok)
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model)
    model.init_weights()
    loaders = ShardedLoaders(source, tok, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size)
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    objective = build_objective(cfg.objective, cfg.model)
    return _Setup(cfg, model, build_optimizer(model, cfg.optim), loaders, objective, LogWindow(0),
                  0, 0, times)  # fmt: skip


def _step(s: _Setup, *, timed: bool) -> None:
    """One step as ``train/step.py``'s ``accumulate_gradients`` and the trainer's loop run it."""
    cfg, env = s.cfg, DistEnv()
    amp = autocast_context(cfg.train.precision, env.device)
    clock = [time.perf_counter()]
    batch = s.loaders.next_batch(0)
    clock.append(time.perf_counter())
    norms = global_counts(s.objective, [batch], env)
    counts = s.objective.counts(batch)
    inputs = s.objective.prepare(batch)  # the routing plan
    flops = train_flops(cfg.model, batch.document_BT, tower_counts=inputs.plan.counts)
    clock.append(time.perf_counter())
    with amp:
        out = s.model(inputs.to(env.device), None)
    result = s.objective.loss(out, batch, inputs)
    result.counts = counts
    step_out = StepOutput(result, out, inputs)
    loss = step_out.loss(norms, micro_batches=1)
    clock.append(time.perf_counter())
    loss.backward()
    clock.append(time.perf_counter())
    grad_norm = clip_gradients(s.model, cfg.optim.grad_clip)
    if bool(torch.isfinite(grad_norm)):
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    clock.append(time.perf_counter())
    s.step += 1
    s.tokens += batch.num_tokens
    s.window.add(step_out, 1)
    if s.step % cfg.run.log_every == 0:
        position = {"step": s.step, "tokens": s.tokens, "flops": flops}
        s.window.row(position, lr=0.0, grad_norm=float(grad_norm))
    clock.append(time.perf_counter())
    if timed:
        for name, a, b in zip(PHASES, clock[:-1], clock[1:], strict=True):
            s.times[name].append((b - a) * 1e3)


def breakdown_rows(args: Any) -> dict[str, Any]:
    """Median milliseconds per phase and per step for dense and MoT (for each AdamW
    implementation in ``args.optim_impls``), and the MoT / dense ratios.

    The variants take one step each in turn (``rounds x steps`` times), so that a shared
    machine's slow spells hit them alike. ``args``: ``tiny`` (debug presets), ``rounds``,
    ``steps``, ``optim_impls`` (comma-separated), ``cache`` (tokenizer cache),
    ``train_threads`` (torch threads of the step, default 1).
    """
    impls = [i for i in args.optim_impls.split(",") if i]
    torch.set_num_threads(getattr(args, "train_threads", 1))
    apply_host_malloc("reuse")  # as the trainer does by default
    keys = [(a, i) for i in impls for a in ("dense", "mot")]
    setups = {k: _setup(f"{k[0]}-debug" if args.tiny else k[0], k[1], args) for k in keys}
    for s in setups.values():
        for _ in range(2):
            _step(s, timed=False)
    for _ in range(args.rounds * args.steps):
        for k in keys:
            _step(setups[k], timed=True)
    out: dict[str, Any] = {"timed_steps": args.rounds * args.steps}
    for (arch, impl), s in setups.items():
        totals = [sum(v) for v in zip(*s.times.values(), strict=True)]
        row = {p: statistics.median(v) for p, v in s.times.items()}
        row["step"] = statistics.median(totals)
        row["step_without_data"] = statistics.median(
            [t - d for t, d in zip(totals, s.times["data"], strict=True)]
        )  # the step with background loading (data off the critical path)
        row["params"] = sum(p.numel() for p in s.model.parameters())
        out[f"{arch}/{impl}"] = row
    for impl in impls:
        d, m = out[f"dense/{impl}"], out[f"mot/{impl}"]
        out[f"mot_over_dense_time/{impl}"] = {k: m[k] / d[k] for k in (*PHASES, "step")}
        out[f"mot_throughput_vs_dense/{impl}"] = d["step"] / m["step"]
        out[f"mot_throughput_vs_dense_without_data/{impl}"] = (
            d["step_without_data"] / m["step_without_data"]
        )
    return out
