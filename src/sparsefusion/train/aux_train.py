"""Stage 2 of MoMa training: auxiliary routers for causal inference (spec 4.3).

``sparsefusion train-aux RUN_DIR [aux.key=value ...]`` loads a finished run (its config and
newest checkpoint), freezes the main model, and trains one small MLP per batch-routed site
(expert-choice groups, MoD layers) with binary cross-entropy against the frozen main routers'
batch top-k decisions, on training batches that continue from the run's data position. It then
validates in both routing modes, batch (as in training) and causal (auxiliary routers decide per
token), and measures each auxiliary router's accuracy against the batch decisions (on the
batch-mode router inputs). Writes ``RUN_DIR/aux_routers/aux_routers.safetensors`` and appends a
row to ``RUN_DIR/aux_routers/metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sparsefusion.checkpoint.store import latest_checkpoint, load_checkpoint
from sparsefusion.config import from_dict, load_yaml
from sparsefusion.data.loader import validation_batches
from sparsefusion.data.shards import ShardedLoaders
from sparsefusion.data.sources import build_source
from sparsefusion.models.inputs import ForwardContext
from sparsefusion.models.transformer import Transformer
from sparsefusion.nn.aux_router import AuxRouters
from sparsefusion.nn.routing_context import RouterRecord
from sparsefusion.objectives.base import Objective, build_objective, caption_order
from sparsefusion.objectives.forward import forward_loss
from sparsefusion.objectives.validate import evaluate
from sparsefusion.runs.config import TrainConfig
from sparsefusion.runtime.device import autocast_context, resolve_device
from sparsefusion.tokenizers.build import load_or_train_tokenizer

log = logging.getLogger("sparsefusion")


@dataclass(kw_only=True)
class AuxTrainConfig:
    """Auxiliary-router training (``aux.*`` overrides of ``train-aux``).

    Attributes:
        steps: optimizer steps (each on one training batch of the run's data settings).
        lr: peak learning rate (AdamW), linear warm-up then linear decay to 1% (spec 4.3).
        warmup_steps: warm-up steps.
        log_every: steps between log lines.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        threads: CPU threads (0 keeps torch's default).
    """

    steps: int = 200
    lr: float = 1e-3
    warmup_steps: int = 20
    log_every: int = 20
    device: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"aux.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("aux.lr must be > 0 and aux.warmup_steps >= 0")


def aux_bce(aux: AuxRouters, records: list[RouterRecord]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean BCE over sites, and per-site (correct, total) decision counts."""
    losses, hits = [], {}
    for r in records:
        logits_nE = aux.logits(r.site, r.x_nD)
        losses.append(F.binary_cross_entropy_with_logits(logits_nE, r.target_nE))
        correct = ((logits_nE > 0).float() == r.target_nE).sum().detach()
        hits[r.site] = (correct, r.target_nE.numel())
    return torch.stack(losses).mean(), hits


def train_aux(run_dir: str | Path, cfg: AuxTrainConfig) -> dict[str, Any]:
    """Train, validate and save the auxiliary routers of a finished run (see module doc)."""
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None or not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} holds no finished run (config.yaml and a checkpoint)")
    run_cfg = from_dict(TrainConfig, load_yaml(run_dir / "config.yaml"))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(run_cfg.seed)
    source = build_source(run_cfg.data, seed=run_cfg.seed, split="train")
    tokenizer = load_or_train_tokenizer(run_cfg.tokenizer, source, log=log.info)
    tokenizer.bind_model(run_cfg.model)
    model = Transformer(run_cfg.model)
    saved = load_checkpoint(ckpt, model, None)
    model.to(device).eval().requires_grad_(False)
    aux = AuxRouters(run_cfg.model.dim, model.router_sites())
    aux.init_weights()
    aux.to(device)
    optimizer = torch.optim.AdamW(aux.parameters(), lr=cfg.lr, weight_decay=0.0)
    accum = run_cfg.train.grad_accum
    loader = ShardedLoaders(source, tokenizer, grad_accum=accum, **_data_kwargs(run_cfg))
    loader.load_state_dict(saved["loader"])  # unseen data after the main run
    objective = build_objective(run_cfg.objective, run_cfg.model)
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, cfg)
        batch = loader.next_batch(step % accum)
        with torch.no_grad():
            records = _trace(model, batch, objective, device)
        loss, _ = aux_bce(aux, records)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.info("aux step %d: bce=%.4f (%.1fs)", step, loss.item(), time.perf_counter() - t0)
    row = validate_aux(model, aux, run_cfg, device)
    row.update(step=cfg.steps, main_step=saved["step"])
    _save(run_dir, aux, row)
    return row


def _data_kwargs(run_cfg: TrainConfig) -> dict[str, Any]:
    """The loader settings the run trained with."""
    data = run_cfg.data
    return {
        "seq_len": data.seq_len,
        "batch_size": data.batch_size,
        "strict": data.strict,
        "max_doc_tokens": data.max_doc_tokens,
        "caption_order": caption_order(run_cfg.objective, run_cfg.seed),
    }


def _lr(step: int, cfg: AuxTrainConfig) -> float:
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (1.0 - 0.99 * min(1.0, frac))


def _trace(model: Transformer, batch, objective: Objective, device) -> list[RouterRecord]:
    """The batch routers' inputs and decisions on one host batch (batch routing)."""
    ctx = ForwardContext(trace=True)
    return forward_loss(model, batch, objective, device=device, ctx=ctx).model.records


@torch.no_grad()
def validate_aux(
    model: Transformer, aux: AuxRouters, run_cfg: TrainConfig, device: torch.device
) -> dict[str, Any]:
    """Validation loss in batch and causal routing modes, and each aux router's accuracy."""
    val_source = build_source(run_cfg.data, seed=run_cfg.seed, split="val")
    tokenizer = load_or_train_tokenizer(run_cfg.tokenizer, val_source, log=log.info)
    tokenizer.bind_model(run_cfg.model)
    val = validation_batches(
        val_source,
        tokenizer,
        num_batches=run_cfg.data.val_batches,
        noise_seed=run_cfg.objective.val_noise_seed,
        **_data_kwargs(run_cfg),
    )
    objective = build_objective(run_cfg.objective, run_cfg.model)
    amp = autocast_context(run_cfg.train.precision, device)
    row: dict[str, Any] = {}
    for mode in ("batch", "causal"):
        ctx = ForwardContext(routing_mode=mode, aux_routers=aux)
        res = evaluate(model, val, objective, device=device, amp=amp, ctx=ctx)
        row.update({f"{mode}/{k}": v for k, v in res.items() if k.startswith("loss")})
    for k in [k for k in row if k.startswith("batch/")]:
        row[f"gap/{k[6:]}"] = row[f"causal/{k[6:]}"] - row[k]
    correct: dict[str, float] = {}
    total: dict[str, int] = {}
    for batch in val:
        for site, (c, n) in aux_bce(aux, _trace(model, batch, objective, device))[1].items():
            correct[site] = correct.get(site, 0.0) + float(c)
            total[site] = total.get(site, 0) + n
    for site in correct:
        row[f"acc/{site}"] = correct[site] / max(1, total[site])
    row["acc/mean"] = sum(correct.values()) / max(1, sum(total.values()))
    return row


def _save(run_dir: Path, aux: AuxRouters, row: dict[str, Any]) -> None:
    out = run_dir / "aux_routers"
    out.mkdir(exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in aux.state_dict().items()}
    save_file(state, str(out / "aux_routers.safetensors"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
