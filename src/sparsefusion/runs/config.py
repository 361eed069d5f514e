"""The root training config: one typed tree composed of each component's own config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from sparsefusion.data.sources import DataConfig
from sparsefusion.distributed.parallelize import DistConfig
from sparsefusion.models.transformer import ModelConfig
from sparsefusion.objectives.base import ObjectiveConfig, image_kind
from sparsefusion.tokenizers.build import TokenizerConfig


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


@dataclass(kw_only=True)
class LoopConfig:
    """The training loop.

    Attributes:
        steps: optimizer steps in the whole run (a resumed run continues up to this).
        grad_accum: micro-batches per optimizer step.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32`` or ``bf16``.
        threads: CPU threads for torch (0 keeps torch's default).
        host_malloc: ``reuse`` (glibc keeps freed blocks up to 1 GiB for reuse instead of
            unmapping them: on the CPU demo step 20-25% faster; ``train/host_malloc.py``) or
            ``system`` (the C library's defaults). Process-wide; a no-op without glibc.
        stop_at: end this invocation after this step (0: run to ``steps``); the schedule still
            spans ``steps``, so a job can be split into chunks that resume one another.
        skip_nonfinite: on a NaN/inf loss or gradient, skip that step's update (counted in the
            metric ``skipped_steps``) instead of stopping the run.
    """

    steps: int = 600
    grad_accum: int = 1
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    threads: int = 0
    host_malloc: Literal["reuse", "system"] = "reuse"
    stop_at: int = 0
    skip_nonfinite: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
        if self.grad_accum < 1:
            raise ValueError(f"train.grad_accum must be >= 1, got {self.grad_accum}")
        if self.host_malloc not in ("reuse", "system"):
            raise ValueError(
                f"train.host_malloc must be 'reuse' or 'system', got {self.host_malloc!r}"
            )
        for name in ("threads", "stop_at"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(kw_only=True)
class RunConfig:
    """Where a run lives and how often it reports.

    Attributes:
        dir: the run folder (config.yaml, metrics.jsonl, checkpoints/, tb/, train.log).
        log_every: steps between training metric rows.
        eval_every: steps between validation passes (0: only at the end).
        eval_generate_every: steps between small generation evaluations (``fid_sf``,
            ``clip_sf``, CIDEr on a few held-out prompts, rows in ``eval.jsonl``) after that
            step's checkpoint (0: off; one process only; see ``sparsefusion eval``).
        save_every: steps between checkpoints (the last step is always saved).
        keep_checkpoints: how many of the newest checkpoints to keep.
        tensorboard: also write TensorBoard events.
        progress: ``auto`` (a bar on a terminal, log lines otherwise), ``bar`` or ``log``.
    """

    dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 100
    eval_generate_every: int = 0
    save_every: int = 100
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: Literal["auto", "bar", "log"] = "auto"

    def __post_init__(self) -> None:
        for name in ("log_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_generate_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"run.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(kw_only=True)
class InitConfig:
    """Where a fresh run's weights come from (``init.*``).

    Attributes:
        from_hf: a Hugging Face model folder (``config.json``, safetensors weights,
            ``tokenizer.json``) whose LLM becomes the text tower and the seed of every other
            tower ("" = random init).
        freeze: "none" or "text": keep the LLM's weights fixed (the text tower, shared layers
            and the LLM's vocabulary rows); only new towers, routers and new rows train.
    """

    from_hf: str = ""
    freeze: Literal["none", "text"] = "none"

    def __post_init__(self) -> None:
        if self.freeze not in ("none", "text"):
            raise ValueError(f"init.freeze must be 'none' or 'text', got {self.freeze!r}")
        if self.freeze != "none" and not self.from_hf:
            raise ValueError("init.freeze=text needs init.from_hf (the text tower to freeze)")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run needs; each component receives only its own sub-config.

    ``tokenizer.image_kind`` follows ``objective.name`` (the objective's registry entry says
    which image tokenizer it trains on): ``auto`` becomes that kind; a kind stated explicitly
    must agree with it.
    """

    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def __post_init__(self) -> None:
        if self.model.max_seq_len < self.data.seq_len:
            raise ValueError(
                f"model.max_seq_len={self.model.max_seq_len} is below data.seq_len="
                f"{self.data.seq_len}: the model would train on positions it is not meant for "
                "(raise model.max_seq_len or lower data.seq_len)"
            )
        need = image_kind(self.objective.name)
        given = self.tokenizer.image_kind
        if given == "auto":
            self.tokenizer = replace(self.tokenizer, image_kind=need)
        elif given != need:
            raise ValueError(
                f"tokenizer.image_kind={given} contradicts objective.name={self.objective.name} "
                f"(which trains on image_kind {need}); leave tokenizer.image_kind out, it follows "
                "objective.name"
            )
