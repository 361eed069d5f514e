"""The data of a run: its training streams and its fixed validation batches, for every objective.

The trainer, train-aux and eval all call :func:`data_for`, so they read the same documents with
the same bad-input rules (``data.strict``, ``data.max_doc_tokens``) and pack them the same way.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Literal

import torch

from sparsefusion.data.loader import validation_batches
from sparsefusion.data.prefetch import BatchStream, resolve_workers
from sparsefusion.data.shards import ShardedLoaders
from sparsefusion.data.sources import build_source
from sparsefusion.objectives.base import caption_order
from sparsefusion.runs.config import TrainConfig

log = logging.getLogger("sparsefusion")


def data_for(
    cfg: TrainConfig,
    split: Literal["train", "val"],
    tokenizer: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    num_batches: int = 0,
) -> Any:
    """``split="train"``: this rank's resumable batch stream (``next_batch(micro)``,
    ``state_dict``, ``load_state_dict``, ``issue_metrics``, ``close``), loaded in the background
    when ``data.workers`` asks for it. ``split="val"``: the fixed validation batches
    (``num_batches``, 0: the run's ``data.val_batches``; continuous image spans get a fixed
    timestep grid and noise seed per batch). ``tokenizer`` must be bound to ``cfg.model``.
    """
    if split == "val":
        return fixed_batches(cfg, "val", tokenizer, num_batches=num_batches)
    source = build_source(cfg.data, seed=cfg.seed, split="train")
    device = device if device is not None else torch.device("cpu")
    workers = resolve_workers(cfg.data.workers, device)
    if cfg.data.workers == "auto":
        log.info("data.workers=auto: %s", "one background worker" if workers else
                 "loading in the training thread (torch's threads use every core)")  # fmt: skip
    loaders = ShardedLoaders(
        source, tokenizer, rank=rank, world_size=world_size, grad_accum=cfg.train.grad_accum,
        **_packing(cfg),
    )  # fmt: skip
    return BatchStream(
        loaders,
        workers=workers,
        prefetch=cfg.data.prefetch,
        pin_memory=device.type == "cuda",
        kind=cfg.data.worker_kind,
        nice=cfg.data.worker_nice,
    )


def fixed_batches(
    cfg: TrainConfig, split: Literal["train", "val"], tokenizer: Any, *, num_batches: int = 0
) -> list:
    """The first ``num_batches`` (0: ``data.val_batches``) batches of ``split``'s documents,
    packed as training packs them, with the validation noise (continuous image spans): the
    validation set, or the same measurement on training documents (how much a model memorised).
    """
    return validation_batches(
        build_source(cfg.data, seed=cfg.seed, split=split), tokenizer,
        num_batches=num_batches or cfg.data.val_batches, noise_seed=cfg.objective.val_noise_seed,
        **_packing(cfg),
    )  # fmt: skip


def source_batches(
    cfg: TrainConfig, split: Literal["train", "val"], tokenizer: Any, *, num_batches: int
) -> dict[str, list]:
    """Per source of a ``data.source=mixture`` run, :func:`fixed_batches` of that source alone
    (its first documents of ``split``, packed as training packs them); ``{}`` for any other
    source. What ``data.val_source_batches`` logs, and ``benchmarks/loss_by_source.py`` reads."""
    if cfg.data.source != "mixture":
        return {}
    return {
        name: fixed_batches(
            replace(cfg, data=replace(cfg.data, mixture={name: 1.0})),
            split,
            tokenizer,
            num_batches=num_batches,
        )  # fmt: skip
        for name in cfg.data.mixture
    }


def _packing(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "seq_len": cfg.data.seq_len,
        "batch_size": cfg.data.batch_size,
        "strict": cfg.data.strict,
        "max_doc_tokens": cfg.data.max_doc_tokens,
        "caption_order": caption_order(cfg.objective, cfg.seed),
    }
