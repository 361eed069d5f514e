"""The root training config: one typed tree composed of each component's own config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sparsefusion.data.sources import DataConfig
from sparsefusion.distributed.parallelize import DistConfig
from sparsefusion.interop.init import InitConfig
from sparsefusion.models.transformer import ModelConfig
from sparsefusion.objectives.base import ObjectiveConfig
from sparsefusion.tokenizers.build import TokenizerConfig
from sparsefusion.train.optim import OptimConfig


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
class TrainConfig:
    """Everything a training run needs; each component receives only its own sub-config."""

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
