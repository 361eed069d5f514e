"""The training loop: build, then fetch, forward, loss, backward, clip, step, log, eval, save.

Running again on a run folder that holds a checkpoint resumes from it and continues exactly as if
never stopped (model, optimizer, data position, RNG and counters are all restored).

Under torchrun every rank runs this same loop on its own data streams (``data/shards.py``);
``distributed/parallelize.py`` wraps the model from outside (FSDP2 or DDP, activation
checkpointing, compile) and checkpoints become sharded DCP checkpoints. Rank 0 alone writes the
config, logs and metrics. Per step, the global batch is ``data.batch_size x world_size x
train.grad_accum`` rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparsefusion.checkpoint.resume import resume_checkpoint, step_folders
from sparsefusion.checkpoint.store import checkpoint_dir
from sparsefusion.checkpoint.training import TrainState, load_training, save_training
from sparsefusion.checkpoint.validate import checkpoint_spec
from sparsefusion.distributed.mesh import (
    DistEnv,
    all_reduce_sum,
    barrier,
    init_distributed,
    launched_by_torchrun,
    teardown,
)
from sparsefusion.distributed.parallelize import parallelize_model
from sparsefusion.interop.init import apply_init, resolve_init
from sparsefusion.models.transformer import Transformer
from sparsefusion.objectives.base import build_objective
from sparsefusion.objectives.validate import evaluate, evaluate_sources
from sparsefusion.runs.config import TrainConfig
from sparsefusion.runs.data import data_for, source_batches
from sparsefusion.runs.folder import check_resume_config, refuse_lost_history, write_config
from sparsefusion.runs.tokenizer import finalize_config, training_tokenizer
from sparsefusion.runtime import faults, preempt, run_lock
from sparsefusion.runtime.device import resolve_device, training_autocast
from sparsefusion.runtime.host_malloc import apply_host_malloc
from sparsefusion.runtime.logs import log_to_run_folder
from sparsefusion.train.guards import check_finite, clip_gradients, on_nonfinite
from sparsefusion.train.metrics import LogWindow, MetricsLogger, NullMetrics
from sparsefusion.train.optim import build_optimizer, lr_at
from sparsefusion.train.progress import Progress, format_row, use_bar
from sparsefusion.train.step import accumulate_gradients, step_flops
from sparsefusion.train.upcycle import upcycle

log = logging.getLogger("sparsefusion")

CheckpointHook = Callable[[Path, torch.nn.Module, TrainConfig, int], Any]


def train(cfg: TrainConfig, *, on_checkpoint: CheckpointHook | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the last training and validation rows.

    Under torchrun (WORLD_SIZE > 1) this joins the process group (and leaves it at the end).
    ``on_checkpoint(run_dir, model, cfg, step)`` runs on rank 0 after the checkpoint of every
    ``run.eval_generate_every``-th step is saved (the CLI passes ``sparsefusion eval``'s small
    evaluation; train/ never imports eval/). Its time is not counted in ``elapsed_s``.
    """
    import torch.distributed as dist

    owns_group = launched_by_torchrun() and not dist.is_initialized()
    env = init_distributed(resolve_device(cfg.train.device), timeout_s=cfg.dist.timeout_s)
    try:
        with run_lock.hold(cfg.run.dir, env), preempt.handlers():
            return _train(cfg, env, on_checkpoint)
    finally:
        if owns_group:
            teardown()


def _train(cfg: TrainConfig, env: DistEnv, on_checkpoint=None) -> dict[str, Any]:
    cfg = resolve_init(cfg)  # init.from_hf: the LLM's architecture and tokenizer
    run_dir = Path(cfg.run.dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log_to_run_folder(run_dir)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    apply_host_malloc(cfg.train.host_malloc)
    if cfg.model.attention_backend == "flex" and env.device.type != "cuda":
        raise ValueError(
            "model.attention_backend=flex trains only on CUDA (torch has no FlexAttention "
            f"backward on {env.device.type}); use model.attention_backend=sdpa"
        )
    torch.manual_seed(cfg.seed)
    refuse_lost_history(run_dir, cfg.run.save_every)  # never start over on a run's history
    tokenizer = training_tokenizer(cfg, env, progress=use_bar(cfg.run.progress) and env.is_main)
    cfg = finalize_config(cfg, tokenizer)
    if env.is_main:
        check_resume_config(run_dir, cfg)
    barrier()

    model = Transformer(cfg.model)
    model.init_weights()
    # With step folders present the run resumes (from a valid one) or is refused below.
    resuming = bool(step_folders(run_dir))
    apply_init(model, cfg, tokenizer.vocab, resumed=resuming)  # init.from_hf / freeze
    seed_state = None
    if not resuming and cfg.model.upcycle_from:  # fresh run only: never copies again on resume
        seed_state = upcycle(model, cfg.model.upcycle_from)
    spec = checkpoint_spec(model)  # names, shapes and dtypes of the unwrapped model
    model.to(env.device)
    num_params = sum(p.numel() for p in model.parameters())
    model = parallelize_model(model, cfg.dist, env)
    optimizer = build_optimizer(model, cfg.optim)
    # Validated against the model and optimizer; damaged ones moved aside.
    ckpt = resume_checkpoint(run_dir, spec.with_optimizer(optimizer), env) if resuming else None
    if env.is_main:  # once the checkpoint is chosen: a refused run changes no file
        write_config(run_dir, cfg)
    loaders = data_for(cfg, "train", tokenizer, rank=env.rank, world_size=env.world_size,
                       device=env.device)  # fmt: skip
    val = data_for(cfg, "val", tokenizer)
    val_sources = (  # data.val_source_batches: each source of a mix alone, beside the mix
        source_batches(cfg, "val", tokenizer, num_batches=cfg.data.val_source_batches)
        if cfg.data.val_source_batches
        else {}
    )

    state = TrainState()
    if ckpt is not None:
        saved = load_training(ckpt, model, optimizer, env)
        loaders.load_state_dict(saved["loader"])
        state = TrainState.from_saved(saved)
        log.info("resumed from %s (step %d)", ckpt, state.step)
    elif seed_state is not None:  # keep the seed's data position (no data is repeated)
        loaders.load_state_dict(seed_state["loader"])
        log.info("upcycled from %s (seed step %d)", cfg.model.upcycle_from, seed_state["step"])
    log.info(
        "model %s: %.2fM parameters, %d towers %s, device %s, %d process(es), strategy %s",
        cfg.model.arch,
        num_params / 1e6,
        cfg.model.num_towers,
        cfg.model.tower_names,
        env.device,
        env.world_size,
        cfg.dist.resolved_strategy(env.is_distributed),
    )
    metrics = (
        MetricsLogger(run_dir, resume_step=state.step, tensorboard=cfg.run.tensorboard)
        if env.is_main
        else NullMetrics()
    )
    try:
        loop = (model, optimizer, loaders, (val, val_sources), state, metrics, env, run_dir)
        return _loop(cfg, *loop, on_checkpoint=_hook(on_checkpoint, cfg, env))
    finally:
        loaders.close()
        metrics.close()


def _loop(
    cfg, model, optimizer, loaders, val, state, metrics, env, run_dir, *, on_checkpoint=None
) -> dict[str, Any]:
    device = env.device
    objective = build_objective(cfg.objective, cfg.model)
    amp = training_autocast(cfg.train.precision, cfg.dist, env)
    last: dict[str, Any] = {}
    window = LogWindow(state.tokens)
    bar = use_bar(cfg.run.progress) and env.is_main
    progress = Progress(total=cfg.train.steps, start=state.step, bar=bar)
    end = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
    accum = cfg.train.grad_accum
    pending_flops = 0.0  # this rank's FLOPs since the last sum over ranks
    while state.step < end:
        t0 = time.perf_counter()
        step = state.step + 1
        lr = lr_at(step, cfg.train.steps, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [loaders.next_batch(micro) for micro in range(accum)]
        outs = accumulate_gradients(
            model,
            batches,
            objective,
            env=env,
            amp=amp,
            poison=faults.nan_at(step),
            draw_seed=(cfg.seed, step),
        )
        for batch, out in zip(batches, outs, strict=True):
            pending_flops += step_flops(cfg.model, batch, out)
            state.tokens += batch.num_tokens * env.world_size
        grad_norm = clip_gradients(model, cfg.optim.grad_clip)
        state.step = step
        if not bool(torch.isfinite(grad_norm)):  # one host sync per step: never apply a NaN
            optimizer.zero_grad(set_to_none=True)
            on_nonfinite(cfg.train.skip_nonfinite, step, float(grad_norm), run_dir)
            state.skipped_steps += 1
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for out in outs:
                window.add(out, accum)
        state.elapsed_s += time.perf_counter() - t0
        stop = preempt.stop_requested(step, env)  # SIGTERM/SIGINT: save this step, then exit
        log_now = step % cfg.run.log_every == 0 or step == cfg.train.steps or stop
        hook_now = on_checkpoint is not None and step % cfg.run.eval_generate_every == 0
        save_now = step % cfg.run.save_every == 0 or step == end or stop or hook_now
        if log_now or save_now:
            state.flops += _sum_over_ranks(pending_flops)
            pending_flops = 0.0
        if log_now and window.n:
            position = {"step": step, **state.position(), "skipped_steps": state.skipped_steps}
            last["train"] = window.row(position, lr=lr, grad_norm=float(grad_norm))
            last["train"].update(loaders.issue_metrics())
            check_finite(last["train"], step)
            metrics.log(last["train"])
            progress.update(step, last["train"])
        if (cfg.run.eval_every and step % cfg.run.eval_every == 0) or step == cfg.train.steps:
            row = evaluate(model, val[0], objective, device=device, amp=amp)
            row |= evaluate_sources(model, val[1], objective, device=device, amp=amp)
            last["val"] = {"step": state.step, "split": "val", **state.position(), **row}
            metrics.log(last["val"])
            progress.write(format_row(last["val"]))
        faults.maybe_pause("pause_at_step", step, run_dir)
        if save_now:
            save_training(run_dir, state, model, optimizer, loaders.state_dict(), env,
                          keep=cfg.run.keep_checkpoints)  # fmt: skip
        if hook_now:
            on_checkpoint(run_dir, model, cfg, step)
        if stop and step < end:
            preempt.exit_after_save(step, checkpoint_dir(run_dir) / f"step_{step:08d}")
    progress.close()
    return last


def _hook(on_checkpoint, cfg: TrainConfig, env: DistEnv):
    """The checkpoint hook for this rank, or None (off, or a multi-process run)."""
    if on_checkpoint is None or not cfg.run.eval_generate_every:
        return None
    if env.is_distributed:  # loading a sharded checkpoint on rank 0 alone would hang the group
        log.warning("run.eval_generate_every is skipped under torchrun; run sparsefusion eval")
        return None
    return on_checkpoint


def _sum_over_ranks(value: float) -> float:
    return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64)).item())
