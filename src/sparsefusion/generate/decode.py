"""The sampling loop over a batch of rows: prefill, then one token per active row per step.

Each :class:`RowSpec` carries its prompt, constraint state machine, sampling settings and
generator. A classifier-free-guidance pair is two rows: the conditional row names its
unconditional partner (``guide``) and the scale; inside image/speech spans its logits become
``uncond + scale * (cond - uncond)`` (scale 1 = the conditional logits), the pair samples ONE id
and both rows append it. Outside spans the conditional logits are used as they are.

Shape legend: B = rows, V = vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sparsefusion.generate.constraints import RowConstraint
from sparsefusion.generate.engine import Decoder
from sparsefusion.generate.sampling import SamplingParams, pick, process_logits


@dataclass
class RowSpec:
    """One row of a decode batch.

    Attributes:
        prompt: prompt ids (BOS first).
        constraint: the row's state machine (its budget bounds the new tokens).
        params: sampling settings.
        generator: the row's random stream.
        opening: ids forced right after the prompt (e.g. BOI for text -> image).
        stop_ids: ids that end the row (besides the mode's own ends).
        guide: index of the unconditional partner row (classifier-free guidance), or None.
        scale: guidance scale of a guided row.
        follower: an unconditional row (it appends what its conditional row samples).
    """

    prompt: list[int]
    constraint: RowConstraint
    params: SamplingParams
    generator: torch.Generator
    opening: list[int] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()
    guide: int | None = None
    scale: float = 1.0
    follower: bool = False


@dataclass
class DecodeResult:
    """New ids of every row (opening ids included) and the wall seconds of the batch."""

    new_ids: list[list[int]]
    seconds: float


def capacity_for(rows: Sequence[RowSpec]) -> int:
    """Cache slots the batch needs: the longest prompt plus its budget."""
    return max(len(r.prompt) + r.constraint.budget for r in rows)


@torch.no_grad()
def decode(decoder: Decoder, rows: Sequence[RowSpec]) -> DecodeResult:
    """Generate every row to its end (stop id, mode end or budget)."""
    t0 = time.perf_counter()
    new: list[list[int]] = [[] for _ in rows]
    first = []
    for b, row in enumerate(rows):
        for i in row.opening:
            row.constraint.advance(i, forced=True)
            new[b].append(i)
        first.append(list(row.prompt) + list(row.opening))
    logits_BV = decoder.last_logits(decoder.extend(first), first)
    while True:
        step = _sample_step(rows, logits_BV.float().cpu(), new)  # the step's one host sync
        if all(r.constraint.done for r in rows):
            break
        logits_BV = decoder.last_logits(decoder.extend(step), step)
    return DecodeResult(new, time.perf_counter() - t0)


def _sample_step(rows: Sequence[RowSpec], logits_BV: torch.Tensor, new: list[list[int]]):
    """Sample one id for every active leading row (and its follower); the ids to feed next."""
    step: list[list[int]] = [[] for _ in rows]
    for b, row in enumerate(rows):
        c = row.constraint
        if row.follower or c.done:
            continue
        logits_V = logits_BV[b]
        if row.guide is not None and c.in_guided_span:
            u_V = logits_BV[row.guide]
            logits_V = u_V + row.scale * (logits_V - u_V)
        allowed_V = c.allowed()
        x_V = process_logits(logits_V, row.params, allowed_V, row.prompt + new[b])
        token = pick(x_V, row.params, row.generator)
        for r in (b,) if row.guide is None else (b, row.guide):
            rows[r].constraint.advance(token)
            new[r].append(token)
            step[r] = [token]
            if token in row.stop_ids:
                rows[r].constraint.done = True
    return step
