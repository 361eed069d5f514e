"""Next-token sampling: greedy, temperature, top-k, top-p, repetition penalty, per-row seeds.

Every row owns a ``torch.Generator`` seeded from its request's seed and sample index, so a
row's draws do not depend on which other rows share its batch. Logits are processed in fp32 on
the host (the one device-to-host transfer of a decode step).

Shape legend: V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one row picks its next token.

    Attributes:
        temperature: 0 = greedy (argmax); > 0 divides the logits.
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set of tokens whose probability reaches p (1 = all).
        repetition_penalty: > 1 discourages ids already in the row (CTRL: positive logits are
            divided by it, negative ones multiplied).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        problems = sampling_problems(
            self.temperature, self.top_k, self.top_p, self.repetition_penalty
        )
        if problems:
            raise ValueError(problems[0])


def sampling_problems(temperature, top_k, top_p, repetition_penalty) -> list[str]:
    """Messages naming every out-of-range sampling value (empty when all are valid)."""
    out = []
    if not temperature >= 0:
        out.append(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not (isinstance(top_k, int) and top_k >= 0):
        out.append(f"top_k must be an int >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        out.append(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        out.append(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    return out


def process_logits(
    logits_V: torch.Tensor,
    params: SamplingParams,
    allowed_V: torch.Tensor | None = None,
    history: Sequence[int] = (),
) -> torch.Tensor:
    """Masked, penalised, temperature-scaled and truncated fp32 logits (-inf = never)."""
    x_V = logits_V.float().clone()
    if params.repetition_penalty != 1.0 and history:
        idx = torch.tensor(sorted(set(history)), dtype=torch.long)
        idx = idx[idx < x_V.numel()]
        seen = x_V[idx]
        x_V[idx] = torch.where(
            seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty
        )
    if allowed_V is not None:
        x_V = x_V.masked_fill(~allowed_V, float("-inf"))
    if params.temperature == 0:
        return x_V
    x_V = x_V / params.temperature
    if params.top_k > 0 and params.top_k < x_V.numel():
        kth = torch.topk(x_V, params.top_k).values[-1]
        x_V = x_V.masked_fill(x_V < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_V, order_V = torch.sort(x_V, descending=True)
        probs_V = torch.softmax(sorted_V, dim=-1)
        before_V = probs_V.cumsum(-1) - probs_V  # mass of the strictly more likely tokens
        drop_V = before_V >= params.top_p
        x_V = x_V.masked_fill(torch.zeros_like(drop_V).scatter(0, order_V, drop_V), float("-inf"))
    return x_V


def pick(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One id from processed logits: argmax when greedy, else a draw with ``generator``."""
    if params.temperature == 0:
        return int(torch.argmax(logits_V))
    probs_V = torch.softmax(logits_V, dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=generator))


def row_generator(seed: int, index: int) -> torch.Generator:
    """The generator of sample ``index`` of a request with ``seed`` (independent streams)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)
