"""How learned routers decide in one forward, and what they report back as values.

A :class:`RoutingContext` is read-only: it says how selections are made (``"batch"``: top-k over the
batch, as in training; ``"causal"``: per-token auxiliary routers, arXiv 2407.21770 section 2.4) and
whether to record the batch decisions (the targets of auxiliary-router training). Routers never
write into it. Each router returns a :class:`RouterStats` beside its output: auxiliary losses,
metrics, ratio sums and decision records as fresh values, merged layer by layer by the model. So a
block that activation checkpointing recomputes in backward cannot duplicate a loss, a metric or a
record (the recompute's return values are discarded), and the recompute performs exactly the same
operations as the forward (no accumulation into state the forward already filled).

Shape legend: n = tokens at one router site, D = model width, E = router outputs (experts, or 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import torch

RoutingMode = Literal["batch", "causal"]


class AuxRouterLookup(Protocol):
    """What causal routing needs from a set of auxiliary routers."""

    def logits(self, site: str, x_nD: torch.Tensor) -> torch.Tensor:
        """Auxiliary router logits (n, E) for router ``site`` (> 0 means selected)."""
        ...


class RouterRecord(NamedTuple):
    """The inputs and batch decisions of one router site in one forward (detached).

    Attributes:
        site: router site name, e.g. ``layer3_ffn_text`` or ``layer2_mod``.
        x_nD: the router's input tokens.
        target_nE: 1.0 where the batch top-k selected (token, expert), else 0.0.
    """

    site: str
    x_nD: torch.Tensor
    target_nE: torch.Tensor


class RouterStats(NamedTuple):
    """What routers report from one forward, as values (never accumulated in place).

    Attributes:
        losses: named, already weighted, auxiliary losses (summed over sites when merged).
        metrics: named detached scalars (tensors: no device-to-host sync).
        ratios: name -> (numerator, denominator) sums over sites, resolved by :meth:`resolved`.
        records: the batch decisions of every site, when the context traces.
    """

    losses: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor]
    ratios: dict[str, tuple[torch.Tensor, torch.Tensor]]
    records: tuple[RouterRecord, ...]

    @staticmethod
    def empty() -> RouterStats:
        return RouterStats({}, {}, {}, ())

    def merge(self, other: RouterStats) -> RouterStats:
        """A new value holding both (losses and ratio sums add; metrics of ``other`` win)."""
        losses = dict(self.losses)
        for k, v in other.losses.items():
            losses[k] = losses[k] + v if k in losses else v
        ratios = dict(self.ratios)
        for k, (num, den) in other.ratios.items():
            if k in ratios:
                ratios[k] = (ratios[k][0] + num, ratios[k][1] + den)
            else:
                ratios[k] = (num, den)
        return RouterStats(
            losses, {**self.metrics, **other.metrics}, ratios, self.records + other.records
        )

    def resolved_metrics(self) -> dict[str, torch.Tensor]:
        """The metrics with every ratio resolved to ``sum(num) / max(1, sum(den))``."""
        out = dict(self.metrics)
        for name, (num, den) in self.ratios.items():
            out[name] = num.float() / den.float().clamp(min=1)
        return out


def ratio(name: str, numerator: torch.Tensor, denominator: float) -> RouterStats:
    """Stats holding one ratio term (e.g. unrouted tokens over tokens at a site)."""
    num = numerator.detach().float()
    return RouterStats(
        {}, {}, {name: (num, torch.tensor(float(denominator), device=num.device))}, ()
    )


@dataclass(frozen=True)
class RoutingContext:
    """How routers decide in one forward (read-only).

    Attributes:
        mode: "batch" (batch-level top-k) or "causal" (auxiliary routers decide per token).
        aux_routers: required in causal mode for expert-choice and MoD sites.
        trace: every batch-mode router returns a :class:`RouterRecord` of its decisions.
        static: static shapes (a compiled decode step): causal routers act by selection and
            masking over every token they see (no data-dependent subset, no host read).
    """

    mode: RoutingMode = "batch"
    aux_routers: AuxRouterLookup | None = None
    trace: bool = False
    static: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("batch", "causal"):
            raise ValueError(f"routing_mode must be 'batch' or 'causal', got {self.mode!r}")
        if self.static and self.mode != "causal":
            raise ValueError("static routing (a decode step) needs routing_mode='causal'")

    @property
    def causal(self) -> bool:
        return self.mode == "causal"

    def causal_selection(self, site: str, x_nD: torch.Tensor) -> torch.Tensor:
        """Per-token decisions of the auxiliary router of ``site``: bool (n, E), score > 0.5."""
        if self.aux_routers is None:
            raise ValueError("routing_mode='causal' needs aux_routers (sparsefusion train-aux)")
        return self.aux_routers.logits(site, x_nD) > 0  # sigmoid(z) > 0.5  <=>  z > 0

    def records(self, site: str, x_nD: torch.Tensor, selected_nE: torch.Tensor):
        """The record tuple of one site's batch decisions (empty unless tracing)."""
        if not self.trace:
            return ()
        return (RouterRecord(site, x_nD.detach(), selected_nE.detach().float()),)
