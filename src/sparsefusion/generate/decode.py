"""The one decoding loop over a batch of rows: prefill, then one id per active row per step.

Each :class:`RowSpec` carries its prompt, constraint state machine, sampling settings and
generator. A classifier-free-guidance pair is two rows: the conditional row names its
unconditional partner (``guide``) and the scale; inside image/speech spans its logits become
``uncond + scale * (cond - uncond)`` (scale 1 = the conditional logits), the pair samples ONE id
and both rows append it. Outside spans the conditional logits are used as they are.

Image spans come from the run's span sampler (``span_samplers.py``). Discrete codes are sampled
here like any other id. A span the sampler fills as a whole (diffusion) opens when a row feeds
its BOI: right after that step the sampler fills the spans of every row that opened one, all
together against the cache, and EOI becomes the row's next id (forced ids draw no random
number). An opening id that opens such a span is fed after the prefill, not in it.

Shape legend: B = rows, V = vocabulary.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sparsefusion.generate.constraints import RowConstraint
from sparsefusion.generate.engine import Decoder
from sparsefusion.generate.sampling import (
    SamplingBatch,
    SamplingParams,
    draw_batch,
    process_batch,
    uniform,
)
from sparsefusion.generate.span_samplers import OpenSpan, SpanSampler, patch_inputs


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
        patches: the prompt's clean image patches (continuous prompts; see ``Prompt``).
        penalize_prompt: the repetition penalty counts the prompt's ids too.
        cancelled: set from another thread to end the row at the next step (its rows stop
            taking part; a served request whose client went away).
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
    patches: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    penalize_prompt: bool = True
    cancelled: threading.Event | None = None


@dataclass
class DecodeResult:
    """New ids of every row (opening ids included), the images its filled spans made, seconds.

    Attributes:
        new_ids: every row's new ids.
        images: every row's images from filled spans (continuous latents), in order.
        seconds: every row's wall seconds of the batch it decoded in.
    """

    new_ids: list[list[int]]
    images: list[list[torch.Tensor]]
    seconds: list[float]


def capacity_for(rows: Sequence[RowSpec]) -> int:
    """Cache slots the batch needs: the longest prompt plus its budget."""
    return max(len(r.prompt) + r.constraint.budget for r in rows)


@torch.no_grad()
def decode(decoder: Decoder, rows: Sequence[RowSpec], spans: SpanSampler) -> DecodeResult:
    """Generate every row to its end (stop id, mode end or budget)."""
    t0 = time.perf_counter()
    new: list[list[int]] = [[] for _ in rows]
    images: list[list[torch.Tensor]] = [[] for _ in rows]
    forced: list[list[int]] = [[] for _ in rows]  # ids a row feeds before it samples again
    first = []
    for b, row in enumerate(rows):
        k = next((j for j, i in enumerate(row.opening) if spans.opens_block(i)), None)
        k = len(row.opening) if k is None else k
        for i in row.opening[:k]:
            row.constraint.advance(i, forced=True)
            new[b].append(i)
        forced[b] = [] if row.follower else list(row.opening[k:])  # a follower copies its lead
        first.append(list(row.prompt) + list(row.opening[:k]))
    out = decoder.step(first, **_prompt_inputs(rows, first))
    logits_BV = decoder.last_logits(out.logits_BTV, first)
    sampler = _Sampler(rows, first, logits_BV.shape[-1], logits_BV.device)
    while True:
        for row in rows:
            if row.cancelled is not None and row.cancelled.is_set():
                row.constraint.done = True
        step = _next_ids(rows, logits_BV, new, forced, spans, sampler)  # the one host read
        if all(r.constraint.done for r in rows):
            break
        if any(i is not None for i in step):
            logits_BV = decoder.advance(step)
            sampler.saw(step)
        opened = [
            b
            for b, i in enumerate(step)
            if i is not None and spans.opens_block(i) and not rows[b].follower
        ]
        if opened:
            _fill(decoder, rows, opened, spans, new, images)
            for b in opened:
                forced[b].append(decoder.vocab.eoi_id)
    return DecodeResult(new, images, [time.perf_counter() - t0] * len(rows))


class _Sampler:
    """The batch's sampling settings on the device and the ids each row has seen (penalty)."""

    def __init__(self, rows: Sequence[RowSpec], first: list[list[int]], V: int, device):
        self.device = device
        self.settings = SamplingBatch.of([r.params for r in rows], device)
        self.seen_BV: torch.Tensor | None = None
        if any(r.params.repetition_penalty != 1.0 for r in rows):
            self.seen_BV = torch.zeros(len(rows), V, dtype=torch.bool)
            for b, (row, ids) in enumerate(zip(rows, first, strict=True)):
                counted = ids if row.penalize_prompt else ids[len(row.prompt) :]
                self.seen_BV[b, [i for i in counted if i < V]] = True
            self.seen_BV = self.seen_BV.to(device)

    def saw(self, step: Sequence[int | None]) -> None:
        """Mark each row's new id as seen."""
        if self.seen_BV is None:
            return
        rows = [b for b, i in enumerate(step) if i is not None]
        ids = [step[b] for b in rows]
        self.seen_BV[
            torch.tensor(rows, device=self.device), torch.tensor(ids, device=self.device)
        ] = True

    def pick(self, rows: Sequence[RowSpec], sampled: list[int], logits_BV: torch.Tensor):
        """One id for each row in ``sampled`` (its guided logits, constraints and settings)."""
        dev = self.device
        index_R = torch.tensor(sampled, device=dev)
        logits_RV = logits_BV.index_select(0, index_R).float()
        guided = [
            b for b in sampled if rows[b].guide is not None and rows[b].constraint.in_guided_span
        ]
        if guided:  # classifier-free guidance: uncond + scale * (cond - uncond)
            at = torch.tensor([sampled.index(b) for b in guided], device=dev)
            u_GV = logits_BV.index_select(
                0, torch.tensor([rows[b].guide for b in guided], device=dev)
            )
            scale_G1 = torch.tensor([rows[b].scale for b in guided], device=dev)[:, None]
            c_GV = logits_RV.index_select(0, at)
            logits_RV = logits_RV.index_copy(0, at, u_GV.float() + scale_G1 * (c_GV - u_GV.float()))
        allowed_RV = torch.stack([rows[b].constraint.allowed() for b in sampled]).to(dev)
        seen_RV = None if self.seen_BV is None else self.seen_BV.index_select(0, index_R)
        settings = self.settings.rows(index_R)
        x_RV = process_batch(logits_RV, settings, allowed_RV, seen_RV)
        u_R = torch.cat(
            [
                uniform(rows[b].generator)
                if rows[b].params.temperature != 0
                else torch.ones(1, dtype=torch.float64)
                for b in sampled
            ]
        ).to(dev)
        return draw_batch(x_RV, settings.temperature_R == 0, u_R).tolist()


def _next_ids(rows, logits_BV, new, forced, spans: SpanSampler, sampler: _Sampler):
    """One id for every active leading row (and its follower): forced, else sampled."""
    step: list[int | None] = [None] * len(rows)
    lead = [b for b, r in enumerate(rows) if not (r.follower or r.constraint.done)]
    sampled = [b for b in lead if not forced[b]]
    picked = (
        dict(zip(sampled, sampler.pick(rows, sampled, logits_BV), strict=True)) if sampled else {}
    )
    for b in lead:
        row = rows[b]
        is_forced = b not in picked
        token = forced[b].pop(0) if is_forced else picked[b]
        stops = not is_forced and token in row.stop_ids and not spans.opens_block(token)
        for r in (b,) if row.guide is None else (b, row.guide):
            rows[r].constraint.advance(token, forced=is_forced)
            new[r].append(token)
            step[r] = token
            if stops:
                rows[r].constraint.done = True
    return step


def _fill(decoder, rows, opened: list[int], spans: SpanSampler, new, images) -> None:
    """Let the span sampler fill the spans the rows ``opened`` (and their partners) just opened."""
    open_spans = [
        OpenSpan(
            row=b,
            generator=rows[b].generator,
            span=len(rows[b].patches) + rows[b].constraint.images - 1,
            guide=rows[b].guide,
            scale=rows[b].scale,
        )
        for b in opened
    ]
    made = spans.fill(decoder, open_spans)
    for b, image in zip(opened, made, strict=True):
        images[b].append(image)
        for r in (b,) if rows[b].guide is None else (b, rows[b].guide):
            for i in spans.span_ids:
                rows[r].constraint.advance(i, forced=True)
            new[r].extend(spans.span_ids)


def _prompt_inputs(rows: Sequence[RowSpec], first: list[list[int]]) -> dict:
    """The prefill's span ids and clean prompt patches (nothing for discrete prompts)."""
    if not any(r.patches for r in rows):
        return {}
    T = max(len(ids) for ids in first)
    span_ids = [[-1] * len(ids) for ids in first]
    where, blocks, starts = [], [], []
    for b, row in enumerate(rows):
        for j, (start, p) in enumerate(row.patches):
            span_ids[b][start : start + p.shape[0]] = [j] * p.shape[0]
            where.append(b)
            blocks.append(p)
            starts.append(start)
    return {"span_ids": span_ids, **patch_inputs(where, blocks, T, 0, starts)}
