"""Validation perplexity per modality under batch and causal routing (MoMa arXiv:2407.21770,
Table 3: the cost of causal inference).

Batch routing is how the model trains (expert choice and Mixture-of-Depths pick their top-k over
the batch); causal routing decides per token with the run's auxiliary routers
(``sparsefusion train-aux``). A model without batch-routed sites (dense, MoT, token choice) routes
the same way in both modes, so its causal numbers are its batch numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sparsefusion.models.inputs import ForwardContext
from sparsefusion.objectives.base import build_objective
from sparsefusion.objectives.validate import evaluate
from sparsefusion.runs.config import TrainConfig
from sparsefusion.runs.folder import load_aux_routers
from sparsefusion.runtime.device import autocast_context


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
