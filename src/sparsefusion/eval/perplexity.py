"""Validation perplexity per modality under batch and causal routing (MoMa arXiv:2407.21770,
Table 3: the cost of causal inference).

Batch routing is how the model trains (expert choice and Mixture-of-Depths pick their top-k over
the batch); causal routing decides per token with the run's auxiliary routers
(``sparsefusion train-aux``). A model without batch-routed sites (dense, MoT, token choice) routes
the same way in both modes, so its causal numbers are its batch numbers.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sparsefusion.checkpoint.weights import load_weights, pick_checkpoint
from sparsefusion.config import from_dict, load_yaml
from sparsefusion.data.loader import validation_batches
from sparsefusion.data.sources import build_source
from sparsefusion.models.inputs import ForwardContext
from sparsefusion.models.transformer import Transformer
from sparsefusion.nn.aux_router import AuxRouters
from sparsefusion.objectives.base import build_objective, caption_order
from sparsefusion.objectives.validate import evaluate
from sparsefusion.runs.config import TrainConfig
from sparsefusion.runtime.device import autocast_context
from sparsefusion.tokenizers.build import load_or_train_tokenizer

log = logging.getLogger("sparsefusion")


def run_config(run_dir: Path) -> TrainConfig:
    """The resolved config of a run folder."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no config.yaml (is it a run folder?)")
    return from_dict(TrainConfig, load_yaml(path))


def load_model(
    run_dir: Path, run_cfg: TrainConfig, step: int | None, device: torch.device
) -> tuple[Any, Path, dict]:
    """The model of checkpoint ``step`` (the newest usable one when None), in eval mode, its
    folder and its saved counters. Checkpoints are validated first (``checkpoint/resume.py``): a
    damaged newest one is skipped with a warning; a damaged or missing requested one is an error.
    """
    model = Transformer(run_cfg.model)
    ckpt = pick_checkpoint(run_dir, model, step)
    load_weights(ckpt, model)
    state = json.loads((ckpt / "state.json").read_text())
    return model.to(device).eval().requires_grad_(False), ckpt, state


def load_aux_routers(run_dir: Path, model: Any, device: torch.device) -> tuple[Any, str]:
    """The run's auxiliary routers, or ``(None, why they are missing)``."""
    path = Path(run_dir) / "aux_routers" / "aux_routers.safetensors"
    if not path.is_file():
        return (
            None,
            f"no auxiliary routers ({path} missing; run `sparsefusion train-aux {run_dir}`)",
        )
    aux = AuxRouters(model.cfg.dim, model.router_sites())
    try:
        aux.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, ValueError, OSError) as e:
        return None, f"auxiliary routers {path} do not fit this model ({e})"
    return aux.to(device).eval(), ""


def val_batches(run_cfg: TrainConfig, num_batches: int) -> list:
    """The run's fixed validation batches (its tokenizer from the cache)."""
    tok_source = build_source(run_cfg.data, seed=0, split="train")
    tokenizer = load_or_train_tokenizer(run_cfg.tokenizer, tok_source, log=log.info)
    tokenizer.bind_model(run_cfg.model)
    data = run_cfg.data
    return validation_batches(
        build_source(run_cfg.data, seed=run_cfg.seed, split="val"),
        tokenizer,
        seq_len=data.seq_len,
        batch_size=data.batch_size,
        num_batches=num_batches or data.val_batches,
        strict=data.strict,
        max_doc_tokens=data.max_doc_tokens,
        caption_order=caption_order(run_cfg.objective, run_cfg.seed),
        noise_seed=run_cfg.objective.val_noise_seed,
    )


def _mode_loss(model, batches, run_cfg: TrainConfig, device, mode: str, aux) -> dict[str, Any]:
    objective = build_objective(run_cfg.objective, run_cfg.model)
    amp = autocast_context(run_cfg.train.precision, device)
    ctx = ForwardContext(routing_mode=mode, aux_routers=aux)  # type: ignore[arg-type]
    return evaluate(model, batches, objective, device=device, amp=amp, ctx=ctx)


def routing_perplexity(
    run_dir: Path, model: Any, run_cfg: TrainConfig, device: torch.device, batches: list
) -> tuple[dict[str, Any], dict[str, str]]:
    """``loss/<mode>[/<modality>]`` and ``ppl/<mode>[/<modality>]`` for batch and causal routing,
    plus ``gap/loss...`` (causal - batch); the second value maps skipped metrics to why."""
    row: dict[str, Any] = {}
    notes: dict[str, str] = {}
    batch_res = _mode_loss(model, batches, run_cfg, device, "batch", None)
    _put(row, "batch", batch_res)
    if not model.router_sites():
        _put(row, "causal", batch_res)
        notes["causal"] = (
            "no batch-routed sites (expert choice, MoD): causal routing = batch routing"
        )
    else:
        aux, why = load_aux_routers(run_dir, model, device)
        if aux is None:
            notes["causal"] = why
            return row, notes
        _put(row, "causal", _mode_loss(model, batches, run_cfg, device, "causal", aux))
    for key in [k for k in row if k.startswith("loss/batch")]:
        row["gap/" + "loss" + key[len("loss/batch") :]] = (
            row[key.replace("batch", "causal", 1)] - row[key]
        )
    return row, notes


def _put(row: dict[str, Any], mode: str, res: dict[str, Any]) -> None:
    for key, value in res.items():
        if key == "loss" or key.startswith("loss/"):
            suffix = key[len("loss") :]
            row[f"loss/{mode}{suffix}"] = value
            row[f"ppl/{mode}{suffix}"] = math.exp(min(value, 50.0))
