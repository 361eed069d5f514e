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

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sparsefusion.distributed.mesh import DistEnv
from sparsefusion.models.inputs import ForwardContext
from sparsefusion.models.transformer import Transformer
from sparsefusion.nn.aux_router import AuxRouters
from sparsefusion.nn.routing_context import RouterRecord
from sparsefusion.objectives.base import Objective, build_objective
from sparsefusion.objectives.forward import forward_loss
from sparsefusion.objectives.validate import evaluate
from sparsefusion.runs.config import TrainConfig
from sparsefusion.runs.data import data_for
from sparsefusion.runs.folder import load_model, require_checkpoint, run_config, save_aux_routers
from sparsefusion.runs.tokenizer import run_tokenizer
from sparsefusion.runtime import run_lock
from sparsefusion.runtime.device import autocast_context, resolve_device

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
    """Mean BCE over sites, and per-site decision counts (correct, total, causal, batch): the
    decisions the aux routers get right, all decisions, and the (token, expert) selections each
    mode makes (causal routing is not capacity-bound, so it may select more or fewer)."""
    losses, hits = [], {}
    for r in records:
        logits_nE = aux.logits(r.site, r.x_nD)
        losses.append(F.binary_cross_entropy_with_logits(logits_nE, r.target_nE))
        chosen_nE = (logits_nE > 0).float().detach()
        correct = (chosen_nE == r.target_nE).sum()
        hits[r.site] = (correct, r.target_nE.numel(), chosen_nE.sum(), r.target_nE.sum())
    return torch.stack(losses).mean(), hits


def train_aux(run_dir: str | Path, cfg: AuxTrainConfig) -> dict[str, Any]:
    """Train, validate and save the auxiliary routers of a finished run (see module doc)."""
    run_dir = Path(run_dir)
    require_checkpoint(run_dir)
    with run_lock.hold(run_dir, DistEnv()):  # a writer of the run folder
        return _train_aux(run_dir, cfg)


def _train_aux(run_dir: Path, cfg: AuxTrainConfig) -> dict[str, Any]:
    run_cfg = run_config(run_dir)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(run_cfg.seed)
    tokenizer = run_tokenizer(run_dir, run_cfg)
    model, _, saved = load_model(run_dir, run_cfg, None, device)
    aux = AuxRouters(run_cfg.model.dim, model.router_sites())
    aux.init_weights()
    aux.to(device)
    optimizer = torch.optim.AdamW(aux.parameters(), lr=cfg.lr, weight_decay=0.0)
    accum = run_cfg.train.grad_accum
    loader = data_for(run_cfg, "train", tokenizer, device=device)
    loader.load_state_dict(_loader_state(run_dir, saved))  # unseen data after the main run
    objective = build_objective(run_cfg.objective, run_cfg.model)
    t0 = time.perf_counter()
    try:
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
                log.info("aux step %d: bce=%.4f (%.1fs)", step, loss.item(),
                         time.perf_counter() - t0)  # fmt: skip
    finally:
        loader.close()
    val = data_for(run_cfg, "val", tokenizer)
    row = validate_aux(model, aux, run_cfg, val, device)
    row.update(step=cfg.steps, main_step=saved["step"])
    save_aux_routers(run_dir, aux, row)
    return row


def _loader_state(run_dir: Path, saved: dict[str, Any]) -> Any:
    """The data position the main run's checkpoint stored (single-process checkpoints)."""
    if "loader" not in saved:
        raise ValueError(
            f"{run_dir}: train-aux reads single-process checkpoints; this one is sharded (DCP). "
            f"Resume it for one step in one process (sparsefusion train) first"
        )
    return saved["loader"]


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
    model: Transformer, aux: AuxRouters, run_cfg: TrainConfig, val: list, device: torch.device
) -> dict[str, Any]:
    """Validation loss in batch and causal routing modes, each aux router's accuracy, and
    ``selected/<site>``: the (token, expert) selections causal routing makes per batch-routed one
    (above 1: causal inference spends more expert compute than training's capacity allowed)."""
    objective = build_objective(run_cfg.objective, run_cfg.model)
    amp = autocast_context(run_cfg.train.precision, device)
    row: dict[str, Any] = {}
    for mode in ("batch", "causal"):
        ctx = ForwardContext(routing_mode=mode, aux_routers=aux)
        res = evaluate(model, val, objective, device=device, amp=amp, ctx=ctx)
        row.update({f"{mode}/{k}": v for k, v in res.items() if k.startswith("loss")})
    for k in [k for k in row if k.startswith("batch/")]:
        row[f"gap/{k[6:]}"] = row[f"causal/{k[6:]}"] - row[k]
    sums: dict[str, list[float]] = {}  # site -> [correct, total, causal, batch]
    for batch in val:
        for site, counts in aux_bce(aux, _trace(model, batch, objective, device))[1].items():
            acc = sums.setdefault(site, [0.0, 0.0, 0.0, 0.0])
            for i, value in enumerate(counts):
                acc[i] += float(value)
    for site, (correct, total, causal, batch_sel) in sums.items():
        row[f"acc/{site}"] = correct / max(1.0, total)
        row[f"selected/{site}"] = causal / max(1.0, batch_sel)
    totals = [sum(v[i] for v in sums.values()) for i in range(4)]
    row["acc/mean"] = totals[0] / max(1.0, totals[1])
    row["selected/mean"] = totals[2] / max(1.0, totals[3])
    return row
