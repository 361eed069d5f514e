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

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sparsefusion.checkpoint import dcp as dist_ckpt
from sparsefusion.checkpoint.resume import resume_checkpoint, step_folders
from sparsefusion.checkpoint.store import (
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from sparsefusion.config import dump_yaml, from_dict, load_yaml, to_dict
from sparsefusion.data.batch import Batch
from sparsefusion.data.loader import validation_batches
from sparsefusion.data.prefetch import LOADING_KEYS, BatchStream, resolve_workers
from sparsefusion.data.shards import ShardedLoaders
from sparsefusion.data.sources import build_source
from sparsefusion.distributed.mesh import (
    DistEnv,
    all_reduce_sum,
    barrier,
    init_distributed,
    launched_by_torchrun,
    teardown,
)
from sparsefusion.distributed.parallelize import parallelize_model
from sparsefusion.models.flops import train_flops
from sparsefusion.models.transformer import Transformer
from sparsefusion.objectives.base import build_objective, caption_order
from sparsefusion.objectives.forward import StepOutput
from sparsefusion.objectives.validate import evaluate
from sparsefusion.runs.config import TrainConfig
from sparsefusion.runtime import faults, preempt, run_lock
from sparsefusion.runtime.device import autocast_context, resolve_device
from sparsefusion.runtime.host_malloc import apply_host_malloc
from sparsefusion.tokenizers.build import load_or_train_tokenizer, load_tokenizer
from sparsefusion.train.metrics import LogWindow, MetricsLogger, NullMetrics
from sparsefusion.train.optim import build_optimizer, lr_at
from sparsefusion.train.progress import Progress
from sparsefusion.train.step import accumulate_gradients
from sparsefusion.train.upcycle import upcycle

log = logging.getLogger("sparsefusion")

CheckpointHook = Callable[[Path, torch.nn.Module, TrainConfig, int], Any]


@dataclass
class TrainState:
    """Counters that survive a restart (the data-loader state travels beside them)."""

    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    skipped_steps: int = 0
    elapsed_s: float = 0.0  # wall-clock seconds spent in training steps, across resumes

    def counters(self) -> dict[str, Any]:
        """What a checkpoint stores beside the weights (``state.json``)."""
        return {
            "tokens": self.tokens,
            "flops": self.flops,
            "skipped_steps": self.skipped_steps,
            "elapsed_s": self.elapsed_s,
        }

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainState:
        return cls(
            step=saved["step"],
            tokens=saved["tokens"],
            flops=saved["flops"],
            skipped_steps=saved.get("skipped_steps", 0),
            elapsed_s=saved.get("elapsed_s", 0.0),
        )


def finalize_config(cfg: TrainConfig, modalities: list[str], vocab_size: int) -> TrainConfig:
    """Fill the fields that come from the tokenizer (vocabulary size) and check modalities."""
    if list(cfg.model.modalities) != list(modalities):
        raise ValueError(
            f"model.modalities={cfg.model.modalities} but the data/tokenizer provide {modalities}"
        )
    if cfg.model.vocab_size == 0:
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=vocab_size))
    elif cfg.model.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} < tokenizer's {vocab_size}")
    return cfg


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
    run_dir = Path(cfg.run.dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _setup_file_logging(run_dir)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    apply_host_malloc(cfg.train.host_malloc)
    device = env.device
    if cfg.model.attention_backend == "flex" and device.type != "cuda":
        raise ValueError(
            "model.attention_backend=flex trains only on CUDA (torch has no FlexAttention "
            f"backward on {device.type}); use model.attention_backend=sdpa"
        )
    torch.manual_seed(cfg.seed)

    source = build_source(cfg.data, seed=cfg.seed, split="train")
    val_source = build_source(cfg.data, seed=cfg.seed, split="val")
    # Tokenizers always learn from the seed-0 training stream, so every run of a corpus shares
    # them (the cache key ignores the seed) whatever order the runs happen in.
    tokenizer = _tokenizer(cfg, build_source(cfg.data, seed=0, split="train"), env)
    cfg = finalize_config(cfg, tokenizer.modalities, tokenizer.vocab.padded_size())
    cfg = replace(cfg, model=tokenizer.bind_model(cfg.model))  # e.g. latent channels, patch size
    if env.is_main:
        _check_resume_config(run_dir, cfg)
        dump_yaml(cfg, run_dir / "config.yaml")
    barrier()

    model = Transformer(cfg.model)
    model.init_weights()
    ckpt = resume_checkpoint(run_dir, model, env)  # validated; damaged ones moved aside
    seed_state = None
    if ckpt is None and cfg.model.upcycle_from:  # fresh run only: a resumed run never copies again
        seed_state = upcycle(model, cfg.model.upcycle_from)
    model.to(device)
    num_params = sum(p.numel() for p in model.parameters())
    model = parallelize_model(model, cfg.dist, env)
    optimizer = build_optimizer(model, cfg.optim)
    loaders, val = _data(cfg, source, val_source, tokenizer, env)

    state = TrainState()
    if ckpt is not None:
        saved = _load(ckpt, model, optimizer, env)
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
        device,
        env.world_size,
        cfg.dist.resolved_strategy(env.is_distributed),
    )
    metrics = (
        MetricsLogger(run_dir, resume_step=state.step, tensorboard=cfg.run.tensorboard)
        if env.is_main
        else NullMetrics()
    )
    try:
        loop = (model, optimizer, loaders, val, state, metrics, env, run_dir)
        return _loop(cfg, *loop, on_checkpoint=_hook(on_checkpoint, cfg, env))
    finally:
        loaders.close()
        metrics.close()


def _data(cfg: TrainConfig, source, val_source, tokenizer, env: DistEnv):
    """The training batch stream of this rank and the fixed validation batches."""
    device = env.device
    common = {
        "seq_len": cfg.data.seq_len,
        "batch_size": cfg.data.batch_size,
        "strict": cfg.data.strict,
        "max_doc_tokens": cfg.data.max_doc_tokens,
        "caption_order": caption_order(cfg.objective, cfg.seed),
    }
    workers = resolve_workers(cfg.data.workers, device)
    if cfg.data.workers == "auto":
        log.info("data.workers=auto: %s", "one background worker" if workers else
                 "loading in the training thread (torch's threads use every core)")  # fmt: skip
    loaders = ShardedLoaders(
        source,
        tokenizer,
        rank=env.rank,
        world_size=env.world_size,
        grad_accum=cfg.train.grad_accum,
        **common,
    )
    loaders = BatchStream(
        loaders,
        workers=workers,
        prefetch=cfg.data.prefetch,
        pin_memory=device.type == "cuda",
        kind=cfg.data.worker_kind,
        nice=cfg.data.worker_nice,
    )
    val = validation_batches(
        val_source,
        tokenizer,
        num_batches=cfg.data.val_batches,
        noise_seed=cfg.objective.val_noise_seed,
        **common,
    )
    return loaders, val


def _tokenizer(cfg: TrainConfig, source, env: DistEnv):
    """Rank 0 trains (or loads) the tokenizer first; the other ranks then load it from cache."""
    if hasattr(source, "tokenizer_dir"):  # token shards carry the tokenizer of their ids
        return load_tokenizer(source.tokenizer_dir())
    tok = None
    if env.is_main:
        tok = load_or_train_tokenizer(cfg.tokenizer, source, progress=_use_bar(cfg), log=log.info)
    barrier()
    if not env.is_main:
        tok = load_or_train_tokenizer(cfg.tokenizer, source, progress=False, log=log.info)
    return tok


def _load(ckpt: Path, model, optimizer, env: DistEnv) -> dict[str, Any]:
    """Load a checkpoint of either format (sharded DCP, or single-process safetensors)."""
    if dist_ckpt.is_dcp_checkpoint(ckpt):
        return dist_ckpt.load_dcp_checkpoint(ckpt, model, optimizer, env)
    if env.is_distributed:
        return dist_ckpt.load_single_checkpoint(ckpt, model, optimizer)
    return load_checkpoint(ckpt, model, optimizer)


def _save(run_dir, step, model, optimizer, state: TrainState, loaders, cfg, env: DistEnv) -> None:
    counters = state.counters()
    keep = cfg.run.keep_checkpoints
    if env.is_distributed:
        dist_ckpt.save_dcp_checkpoint(
            run_dir, step, model, optimizer, counters, loaders.state_dict(), env, keep=keep
        )
    else:
        counters["loader"] = loaders.state_dict()
        save_checkpoint(run_dir, step, model, optimizer, counters, keep=keep)


def _loop(
    cfg, model, optimizer, loaders, val, state, metrics, env, run_dir, *, on_checkpoint=None
) -> dict[str, Any]:
    device = env.device
    objective = build_objective(cfg.objective, cfg.model)
    amp = _amp(cfg, env)
    last: dict[str, Any] = {}
    window = LogWindow(state.tokens)
    progress = Progress(total=cfg.train.steps, start=state.step, bar=_use_bar(cfg) and env.is_main)
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
            model, batches, objective, env=env, amp=amp, poison=faults.nan_at(step)
        )
        for batch, out in zip(batches, outs, strict=True):
            pending_flops += _flops(cfg, batch, out)
            state.tokens += batch.num_tokens * env.world_size
        grad_norm = _clip(model, cfg.optim.grad_clip)
        state.step = step
        if not bool(torch.isfinite(grad_norm)):  # one host sync per step: never apply a NaN
            optimizer.zero_grad(set_to_none=True)
            _nonfinite(cfg, step, float(grad_norm), run_dir)
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
            position = {"step": step, **_position(state), "skipped_steps": state.skipped_steps}
            last["train"] = window.row(position, lr=lr, grad_norm=float(grad_norm))
            last["train"].update(loaders.issue_metrics())
            _check_finite(last["train"], step)
            metrics.log(last["train"])
            progress.update(step, last["train"])
        if (cfg.run.eval_every and step % cfg.run.eval_every == 0) or step == cfg.train.steps:
            row = evaluate(model, val, objective, device=device, amp=amp)
            last["val"] = {"step": state.step, "split": "val", **_position(state), **row}
            metrics.log(last["val"])
            progress.write(_format_row(last["val"]))
        faults.maybe_pause("pause_at_step", step, run_dir)
        if save_now:
            _save(run_dir, step, model, optimizer, state, loaders, cfg, env)
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


def _flops(cfg: TrainConfig, batch: Batch, out: StepOutput) -> float:
    """Training FLOPs of one micro-batch (MoD layers count the pairs they attended)."""
    mod_pairs = {
        int(k.split("/")[1][5:].split("_")[0]): float(v)
        for k, v in out.model.metrics.items()
        if k.startswith("mod/") and k.endswith("/pairs")
    }
    return train_flops(
        cfg.model,
        batch.document_BT,
        tower_counts=out.inputs.plan.counts,
        mod_pairs=mod_pairs or None,
        span_BT=batch.span_BT,
        num_patches=0 if out.inputs.patch_slot_P is None else out.inputs.patch_slot_P.numel(),
    )


def _position(state: TrainState) -> dict[str, Any]:
    return {"tokens": state.tokens, "flops": state.flops, "elapsed_s": state.elapsed_s}


def _amp(cfg: TrainConfig, env: DistEnv) -> contextlib.AbstractContextManager:
    """Autocast, except under FSDP with bf16 parameters (its mixed-precision policy casts)."""
    fsdp_bf16 = (
        env.is_distributed
        and cfg.dist.resolved_strategy(env.is_distributed) == "fsdp"
        and cfg.dist.param_dtype(env.device) == torch.bfloat16
    )
    if fsdp_bf16:
        return contextlib.nullcontext()
    return autocast_context(cfg.train.precision, env.device)


def _sum_over_ranks(value: float) -> float:
    return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64)).item())


def _nonfinite(cfg: TrainConfig, step: int, grad_norm: float, run_dir: Path) -> None:
    """Stop with a clear message (or, with ``train.skip_nonfinite``, log and go on)."""
    if cfg.train.skip_nonfinite:
        log.warning("step %d: non-finite loss/gradient (norm %s): update skipped", step, grad_norm)
        return
    ckpt = latest_checkpoint(run_dir)
    raise FloatingPointError(
        f"non-finite loss or gradient at step {step} (gradient norm {grad_norm}); the run stopped "
        f"before updating the weights. The last good checkpoint is kept: "
        f"{ckpt if ckpt is not None else 'none yet'}. Set train.skip_nonfinite=true to skip such "
        "batches instead."
    )


def _clip(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm (over all ranks' shards under FSDP), clipped to ``max_norm`` if > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(total, "full_tensor"):  # a DTensor (FSDP2): sum the shards' partial norms
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _check_finite(row: dict[str, Any], step: int) -> None:
    if not torch.isfinite(torch.tensor(row["loss"])):
        raise FloatingPointError(
            f"non-finite loss {row['loss']} at step {step}; the last checkpoint is kept intact"
        )


def _format_row(row: dict[str, Any]) -> str:
    keys = [k for k in row if k.startswith("loss")]
    body = " ".join(f"{k}={row[k]:.4f}" for k in keys)
    return f"step {row['step']} {row.get('split', 'train')}: {body}"


def _use_bar(cfg: TrainConfig) -> bool:
    import sys

    if cfg.run.progress == "bar":
        return True
    if cfg.run.progress == "log":
        return False
    return sys.stderr.isatty()


def _check_resume_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to resume a run whose model or data settings changed."""
    path = run_dir / "config.yaml"
    if not path.exists() or not step_folders(run_dir):
        return
    old = load_yaml(path)
    with contextlib.suppress(ValueError):  # keys added since then compare at their defaults
        old = to_dict(from_dict(TrainConfig, old))
    new = to_dict(cfg)
    for d in (old.get("data", {}), new["data"]):  # how batches are loaded, not which ones
        for key in LOADING_KEYS:
            d.pop(key, None)
    for section in ("model", "data", "tokenizer"):
        if old.get(section) != new.get(section):
            key, was, now = _first_difference(old.get(section), new.get(section), section)
            raise ValueError(
                f"{path}: the run folder holds a checkpoint trained with different '{section}' "
                f"settings ({key}={was!r}, now {now!r}); use another run.dir or the same config"
            )


def _first_difference(old: Any, new: Any, key: str) -> tuple[str, Any, Any]:
    """The first dotted key under which ``old`` and ``new`` differ, and both values there."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [*old, *(k for k in new if k not in old)]:
            if old.get(k) != new.get(k):
                return _first_difference(old.get(k), new.get(k), f"{key}.{k}")
    return key, old, new


def _setup_file_logging(run_dir: Path) -> None:
    """Send the package's log to ``<run_dir>/train.log`` (and only this run's file)."""
    path = str((run_dir / "train.log").resolve())
    root = logging.getLogger("sparsefusion")
    for h in list(root.handlers):
        if getattr(h, "_sparsefusion_run_log", False) and h.baseFilename != path:
            root.removeHandler(h)  # an earlier run in this process
            h.close()
    if any(getattr(h, "baseFilename", None) == path for h in root.handlers):
        return
    handler = logging.FileHandler(path)
    handler._sparsefusion_run_log = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
