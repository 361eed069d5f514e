"""The training loop: build, then fetch, forward, loss, backward, clip, step, log, eval, save.

Running again on a run folder that holds a checkpoint resumes from it and continues exactly as if
never stopped (model, optimizer, data position, RNG and counters are all restored).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sparsefusion.config import dump_yaml, load_yaml, to_dict
from sparsefusion.data.batch import Batch
from sparsefusion.data.loader import PackedLoader, validation_batches
from sparsefusion.data.sources import build_source
from sparsefusion.eval.loss_eval import evaluate
from sparsefusion.models.flops import train_flops
from sparsefusion.models.transformer import Transformer
from sparsefusion.objectives.ar import ar_loss
from sparsefusion.tokenizers.build import load_or_train_tokenizer
from sparsefusion.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sparsefusion.train.config import TrainConfig
from sparsefusion.train.metrics import MetricsLogger
from sparsefusion.train.optim import build_optimizer, lr_at
from sparsefusion.train.progress import Progress

log = logging.getLogger("sparsefusion")


@dataclass
class TrainState:
    """Counters that survive a restart (the data-loader state travels beside them)."""

    step: int = 0
    tokens: int = 0
    flops: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available")
    return torch.device(name)


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns the last training and validation rows."""
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_file_logging(run_dir)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.seed)

    source = build_source(cfg.data, seed=cfg.seed, split="train")
    val_source = build_source(cfg.data, seed=cfg.seed, split="val")
    tokenizer = load_or_train_tokenizer(cfg.tokenizer, source, progress=_use_bar(cfg), log=log.info)
    cfg = finalize_config(cfg, tokenizer.modalities, tokenizer.vocab.padded_size())
    _check_resume_config(run_dir, cfg)
    dump_yaml(cfg, run_dir / "config.yaml")

    model = Transformer(cfg.model)
    model.init_weights()
    model.to(device)
    optimizer = build_optimizer(model, cfg.optim)
    bad_input = {"strict": cfg.data.strict, "max_doc_tokens": cfg.data.max_doc_tokens}
    loader = PackedLoader(
        source, tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, **bad_input
    )
    val = validation_batches(
        val_source,
        tokenizer,
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size,
        num_batches=cfg.data.val_batches,
        **bad_input,
    )

    state = TrainState()
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        saved = load_checkpoint(ckpt, model, optimizer)
        loader.load_state_dict(saved["loader"])
        state = TrainState(step=saved["step"], tokens=saved["tokens"], flops=saved["flops"])
        log.info("resumed from %s (step %d)", ckpt, state.step)
    log.info(
        "model %s: %.2fM parameters, %d towers %s, device %s",
        cfg.model.arch,
        sum(p.numel() for p in model.parameters()) / 1e6,
        cfg.model.num_towers,
        cfg.model.tower_names,
        device,
    )
    metrics = MetricsLogger(run_dir, resume_step=state.step, tensorboard=cfg.run.tensorboard)
    try:
        return _loop(cfg, model, optimizer, loader, val, state, metrics, device, run_dir)
    finally:
        metrics.close()


def _loop(cfg, model, optimizer, loader, val, state, metrics, device, run_dir) -> dict[str, Any]:
    modalities = cfg.model.modalities
    towers = (cfg.model.tower_of_modality, cfg.model.num_towers)
    amp = autocast_context(cfg.train.precision, device)
    last: dict[str, Any] = {}
    window = _Window(len(modalities), state.tokens)
    progress = Progress(total=cfg.train.steps, start=state.step, bar=_use_bar(cfg))
    end = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
    while state.step < end:
        step = state.step + 1
        lr = lr_at(step, cfg.train.steps, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(cfg.train.grad_accum):
            batch = loader.next_batch()
            state.flops += train_flops(cfg.model, batch.document_BT)
            state.tokens += batch.num_tokens
            out = _forward_loss(model, batch.with_plan(*towers).to(device), cfg, amp)
            (out.loss / cfg.train.grad_accum).backward()
            window.add(out)
        grad_norm = _clip(model, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step = step
        if step % cfg.run.log_every == 0 or step == cfg.train.steps:
            last["train"] = window.row(
                state, lr=lr, grad_norm=float(grad_norm), modalities=modalities
            )
            last["train"].update(loader.issue_metrics())
            _check_finite(last["train"], step)
            metrics.log(last["train"])
            progress.update(step, last["train"])
        if (cfg.run.eval_every and step % cfg.run.eval_every == 0) or step == cfg.train.steps:
            last["val"] = _validate(model, val, cfg, towers, amp, state, device)
            metrics.log(last["val"])
            progress.write(_format_row(last["val"]))
        if step % cfg.run.save_every == 0 or step == end:
            save_checkpoint(
                run_dir,
                step,
                model,
                optimizer,
                {"tokens": state.tokens, "flops": state.flops, "loader": loader.state_dict()},
                keep=cfg.run.keep_checkpoints,
            )
    progress.close()
    return last


def _forward_loss(model, batch: Batch, cfg: TrainConfig, amp):
    with amp:
        out = model(
            batch.tokens_BT,
            position_BT=batch.position_BT,
            document_BT=batch.document_BT,
            plan=batch.plan,
        )
    return ar_loss(
        out.logits_BTV,
        batch.targets_BT,
        batch.target_modality_BT,
        num_modalities=len(cfg.model.modalities),
        z_loss=cfg.objective.z_loss,
    )


def _validate(model, val, cfg, towers, amp, state, device) -> dict[str, Any]:
    def loss_fn(batch: Batch):
        return _forward_loss(model, batch.with_plan(*towers).to(device), cfg, amp)

    row = evaluate(model, val, loss_fn, cfg.model.modalities)
    return {"step": state.step, "split": "val", "tokens": state.tokens, "flops": state.flops, **row}


def _clip(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))


class _Window:
    """Accumulates per-modality loss sums between two logged steps (on device, no syncs)."""

    def __init__(self, num_modalities: int, tokens: int) -> None:
        self.num_modalities = num_modalities
        self.reset(tokens)

    def reset(self, tokens: int) -> None:
        self.ce_sum = None
        self.count = None
        self.z = 0.0
        self.n = 0
        self.t0 = time.perf_counter()
        self.tokens0 = tokens

    def add(self, out) -> None:
        self.ce_sum = out.ce_sum_M if self.ce_sum is None else self.ce_sum + out.ce_sum_M
        self.count = out.count_M if self.count is None else self.count + out.count_M
        self.z = self.z + out.z_loss
        self.n += 1

    def row(self, state: TrainState, *, lr: float, grad_norm: float, modalities) -> dict[str, Any]:
        ce, count = self.ce_sum.cpu().tolist(), self.count.cpu().tolist()
        elapsed = time.perf_counter() - self.t0
        row: dict[str, Any] = {
            "step": state.step,
            "tokens": state.tokens,
            "flops": state.flops,
            "loss": sum(ce) / max(1, sum(count)),
        }
        for name, s, c in zip(modalities, ce, count, strict=True):
            if c > 0:
                row[f"loss/{name}"] = s / c
        row["z_loss"] = float(self.z) / max(1, self.n)
        row["lr"] = lr
        row["grad_norm"] = grad_norm
        row["tokens_per_s"] = (state.tokens - self.tokens0) / elapsed if elapsed > 0 else 0.0
        self.reset(state.tokens)
        return row


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
    if not path.exists() or latest_checkpoint(run_dir) is None:
        return
    old = load_yaml(path)
    new = to_dict(cfg)
    for section in ("model", "data", "tokenizer"):
        if old.get(section) != new.get(section):
            raise ValueError(
                f"{path}: the run folder holds a checkpoint trained with different '{section}' "
                "settings; use another run.dir or the same config"
            )


def _setup_file_logging(run_dir: Path) -> None:
    path = str(run_dir / "train.log")
    root = logging.getLogger("sparsefusion")
    if any(getattr(h, "baseFilename", None) == str(Path(path).resolve()) for h in root.handlers):
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
