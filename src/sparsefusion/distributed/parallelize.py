"""Parallelism applied from outside the model: activation checkpointing, compile, FSDP2 or DDP.

Everything here iterates ``model.layers`` (a ``ModuleList`` holding every block, whatever its
type: dense, MoT, MoE, MoMa, MoD), so a new block type is covered without touching this file.
Order (as in torchtitan): activation checkpointing wraps each block, then ``torch.compile``
compiles each (wrapped) block in place, then FSDP2 ``fully_shard`` makes each block one sharding
unit (all tower copies of a layer together) and the root a last unit (embedding, final norm,
head); or DDP wraps the root.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn

from sparsefusion.distributed.mesh import DistEnv

log = logging.getLogger("sparsefusion")


@dataclass(kw_only=True)
class DistConfig:
    """Data parallelism and memory savers (config key ``dist``).

    Attributes:
        strategy: ``auto`` (the default: ``fsdp`` when launched with more than one process,
            else ``none``), ``none`` (one process), ``ddp`` (replicated weights, all-reduced
            gradients) or ``fsdp`` (FSDP2 ``fully_shard`` per block and at the root).
            ``ddp``/``fsdp`` take effect under torchrun; a plain single process ignores them
            with a warning.
        activation_checkpointing: ``none``; ``full`` (recompute each whole block in backward);
            ``selective`` (per block, keep the outputs of matmuls and attention, recompute the
            cheap elementwise ops and norms).
        compile: ``torch.compile`` each block (in place, so parameter names do not change).
        mixed_precision: FSDP parameter dtype for compute: ``auto`` (bf16 on CUDA, fp32 on CPU),
            ``bf16`` or ``fp32``. Gradients are always reduced in fp32 and the sharded master
            weights and optimizer state stay fp32.
        reshard_after_forward: FSDP frees each block's gathered weights after its forward
            (ZeRO-3; re-gathered in backward). False keeps them until backward (ZeRO-2-like).
        timeout_s: collective timeout in seconds.
    """

    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    compile: bool = False
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    reshard_after_forward: bool = True
    timeout_s: int = 600

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("strategy", self.strategy, ("auto", "none", "ddp", "fsdp")),
            ("activation_checkpointing", self.activation_checkpointing, _AC_MODES),
            ("mixed_precision", self.mixed_precision, ("auto", "bf16", "fp32")),
        ):
            if value not in choices:
                raise ValueError(f"dist.{name} must be one of {choices}, got {value!r}")
        if self.timeout_s < 1:
            raise ValueError(f"dist.timeout_s must be >= 1, got {self.timeout_s}")

    def resolved_strategy(self, distributed: bool) -> str:
        """The strategy in effect: ``auto`` is ``fsdp`` with several processes, else ``none``."""
        if self.strategy == "auto":
            return "fsdp" if distributed else "none"
        return self.strategy

    def param_dtype(self, device: torch.device) -> torch.dtype:
        """The FSDP compute dtype of parameters on ``device``."""
        if self.mixed_precision == "bf16" or (
            self.mixed_precision == "auto" and device.type == "cuda"
        ):
            return torch.bfloat16
        return torch.float32


_AC_MODES = ("none", "full", "selective")


def parallelize_model(model: nn.Module, cfg: DistConfig, env: DistEnv) -> nn.Module:
    """Apply activation checkpointing, compile and FSDP2/DDP to ``model``.

    Args:
        model: a module with a ``layers`` ModuleList of blocks, already on ``env.device`` and
            initialised (identically on every rank).
        cfg: the ``dist`` config.
        env: the process group this rank belongs to.

    Returns:
        The model to train: ``model`` itself (changed in place) or, for DDP, its wrapper.
    """
    if cfg.activation_checkpointing != "none":
        apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        for layer in model.layers:
            layer.compile()
    if not env.is_distributed:
        if cfg.strategy not in ("none", "auto"):
            log.warning("dist.strategy=%s needs torchrun: training as one process", cfg.strategy)
        return model
    strategy = cfg.resolved_strategy(distributed=True)
    if strategy == "none":
        raise ValueError(
            f"launched with {env.world_size} processes but dist.strategy=none; "
            "set dist.strategy=auto (FSDP2), fsdp or ddp"
        )
    if strategy == "fsdp":
        return apply_fsdp(model, cfg, env)
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def apply_fsdp(model: nn.Module, cfg: DistConfig, env: DistEnv) -> nn.Module:
    """FSDP2 ``fully_shard`` on every block of ``model.layers``, then on the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = cfg.param_dtype(env.device)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(
            layer, mesh=env.mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward
        )
    fully_shard(model, mesh=env.mesh, mp_policy=mp, reshard_after_forward=False)
    log.info("FSDP2: %d block units + root, params in %s", len(model.layers), dtype)
    return model


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap every block of ``model.layers`` in a checkpoint wrapper (``full`` or ``selective``)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode not in ("full", "selective"):
        raise ValueError(f"dist.activation_checkpointing must be full or selective, got {mode!r}")
    context_fn = _selective_context if mode == "selective" else None
    for i, layer in enumerate(model.layers):
        # The recompute must replay the forward exactly: routers that draw noise (Gumbel
        # expert choice) need the same random numbers, so the RNG state is stashed and restored.
        kwargs = {"preserve_rng_state": True}
        if context_fn is not None:
            kwargs["context_fn"] = context_fn
        model.layers[i] = checkpoint_wrapper(layer, **kwargs)


def _save_ops() -> set:
    aten = torch.ops.aten
    names = [
        "mm",
        "addmm",
        "bmm",
        "_grouped_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    ]
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _selective_policy(save_ops: set, ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in save_ops else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(partial(_selective_policy, _save_ops()))


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a DDP wrapper (the model itself otherwise)."""
    return model.module if hasattr(model, "module") and not hasattr(model, "layers") else model
