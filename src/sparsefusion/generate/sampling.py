"""Next-token sampling: greedy, temperature, top-k, top-p, repetition penalty, per-row seeds.

Every row owns a ``torch.Generator`` seeded from its request's seed and sample index, so a
row's draws do not depend on which other rows share its batch. The rows of a decode step are
processed together where the logits live (:func:`process_batch`: row-wise operations only) and
picked by inverse-CDF sampling with each row's own uniform draw (:func:`draw_batch`); the sampled
ids are the one thing a decode step reads back on the host.

Shape legend: R = rows being sampled, V = vocabulary.
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


@dataclass(frozen=True)
class SamplingBatch:
    """The sampling settings of R rows as tensors (one vectorised pass for all of them).

    Attributes:
        temperature_R: 0 = greedy.
        top_k_R: 0 = off.
        top_p_R: 1 = off.
        penalty_R: repetition penalty, 1 = off.
    """

    temperature_R: torch.Tensor
    top_k_R: torch.Tensor
    top_p_R: torch.Tensor
    penalty_R: torch.Tensor

    @staticmethod
    def of(params: Sequence[SamplingParams], device: torch.device | str = "cpu") -> SamplingBatch:
        host = torch.tensor(
            [[p.temperature, p.top_k, p.top_p, p.repetition_penalty] for p in params],
            dtype=torch.float64,
        ).to(device)
        return SamplingBatch(
            temperature_R=host[:, 0].float(),
            top_k_R=host[:, 1].long(),
            top_p_R=host[:, 2].float(),
            penalty_R=host[:, 3].float(),
        )

    def rows(self, index_R: torch.Tensor) -> SamplingBatch:
        """The settings of the rows ``index_R``."""
        return SamplingBatch(*(t.index_select(0, index_R) for t in (
            self.temperature_R, self.top_k_R, self.top_p_R, self.penalty_R)))  # fmt: skip


def process_batch(
    logits_RV: torch.Tensor,
    settings: SamplingBatch,
    allowed_RV: torch.Tensor | None = None,
    seen_RV: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked, penalised, temperature-scaled and truncated fp32 logits of R rows (-inf = never).

    Every operation is row-wise, so a row's result does not depend on the other rows; greedy
    rows (temperature 0) are masked and penalised only. ``seen_RV``: ids already in each row
    (the repetition penalty's history).
    """
    x_RV = logits_RV.float()
    R, V = x_RV.shape
    if seen_RV is not None:
        pen_R1 = settings.penalty_R[:, None]
        penalised_RV = torch.where(x_RV > 0, x_RV / pen_R1, x_RV * pen_R1)
        x_RV = torch.where(seen_RV[:, :V] & (pen_R1 != 1.0), penalised_RV, x_RV)
    if allowed_RV is not None:
        x_RV = x_RV.masked_fill(~allowed_RV[:, :V], float("-inf"))
    temp_R1 = settings.temperature_R[:, None]
    greedy_R1 = temp_R1 == 0
    y_RV = x_RV / torch.where(greedy_R1, 1.0, temp_R1)
    sorted_RV, order_RV = torch.sort(y_RV, dim=-1, descending=True)
    k_R = torch.where((settings.top_k_R > 0) & (settings.top_k_R < V), settings.top_k_R, V)
    kth_R1 = sorted_RV.gather(1, (k_R - 1)[:, None])
    drop_RV = y_RV < kth_R1
    probs_RV = torch.softmax(sorted_RV.masked_fill(sorted_RV < kth_R1, float("-inf")), dim=-1)
    before_RV = probs_RV.cumsum(-1) - probs_RV  # mass of the strictly more likely tokens
    top_p_R1 = settings.top_p_R[:, None]
    drop_sorted_RV = (before_RV >= top_p_R1) & (top_p_R1 < 1.0)
    drop_RV = drop_RV | torch.zeros_like(drop_RV).scatter(1, order_RV, drop_sorted_RV)
    return torch.where(greedy_R1, x_RV, y_RV.masked_fill(drop_RV, float("-inf")))


def draw_batch(x_RV: torch.Tensor, greedy_R: torch.Tensor, u_R: torch.Tensor) -> torch.Tensor:
    """One id per row from processed logits: argmax when greedy, else inverse-CDF sampling.

    ``u_R`` in (0, 1] is the row's own uniform draw, so the pick depends on nothing but the
    row's logits and its random stream (never on the batch).
    """
    probs_RV = torch.softmax(x_RV, dim=-1)
    cdf_RV = probs_RV.cumsum(-1)
    target_R1 = (u_R[:, None] * cdf_RV[:, -1:]).to(cdf_RV.dtype)
    sampled_R = torch.searchsorted(cdf_RV, target_R1).squeeze(1).clamp(max=x_RV.shape[1] - 1)
    return torch.where(greedy_R, x_RV.argmax(-1), sampled_R)


def uniform(generator: torch.Generator, n: int = 1) -> torch.Tensor:
    """``n`` draws in (0, 1] from ``generator`` (inverse-CDF sampling never picks a 0-prob id)."""
    return 1.0 - torch.rand(n, generator=generator, dtype=torch.float64)


def process_logits(
    logits_V: torch.Tensor,
    params: SamplingParams,
    allowed_V: torch.Tensor | None = None,
    history: Sequence[int] = (),
) -> torch.Tensor:
    """:func:`process_batch` of one row (``history``: the ids the penalty counts)."""
    seen_1V = None
    if params.repetition_penalty != 1.0 and history:
        idx = torch.tensor(sorted(set(history)), dtype=torch.long)
        idx = idx[idx < logits_V.numel()]
        seen_1V = torch.zeros(1, logits_V.numel(), dtype=torch.bool)
        seen_1V[0, idx] = True
    allowed_1V = None if allowed_V is None else allowed_V[None]
    return process_batch(logits_V[None], SamplingBatch.of([params]), allowed_1V, seen_1V)[0]


def pick(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One id from processed logits: argmax when greedy, else one draw from ``generator``."""
    greedy = torch.tensor([params.temperature == 0])
    u = uniform(generator) if params.temperature != 0 else torch.ones(1, dtype=torch.float64)
    return int(draw_batch(logits_V[None].float(), greedy, u)[0])


def row_generator(seed: int, index: int) -> torch.Generator:
    """The generator of sample ``index`` of a request with ``seed`` (independent streams)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)
