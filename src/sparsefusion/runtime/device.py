"""Device and precision choices shared by training, train-aux, evaluation and generation."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a named CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available")
    return torch.device(name)


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for (or ``auto`` on CUDA), else a no-op context."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_autocast(precision: str, dist: Any, env: Any) -> contextlib.AbstractContextManager:
    """Autocast for training, except under FSDP with bf16 parameters (whose mixed-precision
    policy casts): ``dist`` is the run's ``DistConfig``, ``env`` its ``DistEnv``."""
    fsdp_bf16 = (
        env.is_distributed
        and dist.resolved_strategy(env.is_distributed) == "fsdp"
        and dist.param_dtype(env.device) == torch.bfloat16
    )
    if fsdp_bf16:
        return contextlib.nullcontext()
    return autocast_context(precision, env.device)
