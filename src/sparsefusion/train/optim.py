"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer and schedule (Chameleon defaults, spec section 1).

    Attributes:
        lr: peak learning rate.
        betas: AdamW (beta1, beta2).
        eps: AdamW epsilon.
        weight_decay: decoupled weight decay, applied to matrices only (not norms).
        grad_clip: global gradient-norm clip (0 disables).
        warmup_steps: linear warm-up from 0 to ``lr``.
        schedule: decay after warm-up: ``linear`` or ``cosine`` to ``lr * min_lr_ratio``, or
            ``constant``.
        min_lr_ratio: final learning rate as a fraction of the peak.
        impl: AdamW implementation: ``auto`` (``fused`` when every parameter is a float tensor
            on CPU or CUDA, else ``foreach``), ``fused`` (one kernel over all tensors; on CPU
            about 5x faster than the loop for the demo models), ``foreach`` or ``for_loop``.
    """

    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 50
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"optim.lr must be a finite number > 0, got {self.lr}")
        for name, value in (("weight_decay", self.weight_decay), ("grad_clip", self.grad_clip)):
            if not 0 <= value < math.inf:  # also refuses NaN
                raise ValueError(f"optim.{name} must be a finite number >= 0, got {value}")
        if not 0 < self.eps < math.inf:
            raise ValueError(f"optim.eps must be a finite number > 0, got {self.eps}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.impl not in _IMPLS:
            raise ValueError(f"optim.impl must be one of {_IMPLS}, got {self.impl!r}")


_IMPLS = ("auto", "fused", "foreach", "for_loop")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW (``cfg.impl``) with two parameter groups: decayed matrices, undecayed norms and
    vectors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    impl = cfg.impl
    if impl == "auto":
        fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                      for p in decay + no_decay)  # fmt: skip
        impl = "fused" if fusable else "foreach"
    kw = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kw)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (1-based) of ``total_steps``.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    if cfg.warmup_steps > 0 and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    frac = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - floor) * frac
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * frac))
