"""One optimizer step's gradients: forward and backward of every micro-batch (token-weighted)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from sparsefusion.data.batch import Batch
from sparsefusion.distributed.mesh import DistEnv, all_reduce_sum
from sparsefusion.models.flops import train_flops
from sparsefusion.models.transformer import ModelConfig
from sparsefusion.objectives.base import Objective
from sparsefusion.objectives.forward import StepOutput, forward_loss


def accumulate_gradients(
    model: nn.Module,
    batches: list[Batch],
    objective: Objective,
    *,
    env: DistEnv,
    amp: contextlib.AbstractContextManager | None = None,
    poison: bool = False,
    draw_seed: tuple[int, int] | None = None,
) -> list[StepOutput]:
    """Forward and backward every micro-batch of one optimizer step (token-weighted).

    Every loss term is divided by its count over the WHOLE global batch (all micro-batches of
    all ranks, one small all-reduce of host counts before the first backward), so the summed
    gradient equals that of one batch holding every row; router losses are averaged over
    micro-batches. Data-parallel wrappers average gradients over ranks, so each rank normalises
    by the global count over the number of ranks. DDP skips its all-reduce on all but the last
    micro-batch. ``poison`` multiplies the losses by NaN (fault injection for tests).

    ``draw_seed`` = (run seed, step): the objective's random draws (diffusion noise and
    timesteps) for a micro-batch come from a generator of (seed, step, its data stream), so
    they belong to the batch, not to the process: 2 ranks draw what 1 process with 2
    micro-batches draws, and a resumed run what an uninterrupted one drew. None: the global RNG.
    """
    norms = global_counts(objective, batches, env)
    outs = []
    for micro, batch in enumerate(batches):
        gen = None
        if draw_seed is not None:
            gen = draw_generator(*draw_seed, stream=env.rank * len(batches) + micro)
        with _maybe_no_sync(model, last_micro=micro == len(batches) - 1):
            out = forward_loss(model, batch, objective, device=env.device, amp=amp, generator=gen)
            loss = out.loss(norms, micro_batches=len(batches))
            (loss * float("nan") if poison else loss).backward()
        outs.append(out)
    return outs


def draw_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """The generator of data stream ``stream``'s draws at ``step`` (a host generator)."""
    mixed = ((seed * 1_000_003 + step) * 1_009 + stream) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def global_counts(objective: Objective, batches: list[Batch], env: DistEnv) -> dict[str, float]:
    """Counts of the whole global batch (all micro-batches, all ranks), per rank's share."""
    per_batch = [objective.counts(b) for b in batches]
    names = sorted(per_batch[0])
    local = torch.tensor([[c[n] for n in names] for c in per_batch], dtype=torch.float64).sum(0)
    if env.world_size > 1:  # one small collective per step (on the device: NCCL needs it)
        local = all_reduce_sum(local.to(env.device)).cpu()
    return {n: float(v) / env.world_size for n, v in zip(names, local.tolist(), strict=True)}


def _maybe_no_sync(model, *, last_micro: bool) -> contextlib.AbstractContextManager:
    """DDP: skip the gradient all-reduce on all but the last micro-batch of a step."""
    if not last_micro and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def step_flops(model_cfg: ModelConfig, batch: Batch, out: StepOutput) -> float:
    """Training FLOPs of one micro-batch (MoD layers count the pairs they attended)."""
    mod_pairs = {
        int(k.split("/")[1][5:].split("_")[0]): float(v)
        for k, v in out.model.metrics.items()
        if k.startswith("mod/") and k.endswith("/pairs")
    }
    return train_flops(
        model_cfg,
        batch.document_BT,
        tower_counts=out.inputs.plan.counts,
        mod_pairs=mod_pairs or None,
        span_BT=batch.span_BT,
        num_patches=0 if out.inputs.patch_slot_P is None else out.inputs.patch_slot_P.numel(),
    )
