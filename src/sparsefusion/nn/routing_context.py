"""Per-forward routing state shared by the learned routers (experts, Mixture-of-Depths).

One :class:`RoutingContext` is created by the model for every forward pass and handed to each
router. It says how selections are made (``"batch"``: top-k over the batch, as in training;
``"causal"``: per-token auxiliary routers, arXiv 2407.21770 section 2.4), optionally records the
batch decisions (the targets of auxiliary-router training), and collects auxiliary losses and
metrics, which leave the model through ``ModelOutput`` (never through globals).

Shape legend: n = tokens at one router site, D = model width, E = router outputs (experts, or 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

RoutingMode = Literal["batch", "causal"]


class AuxRouterLookup(Protocol):
    """What causal routing needs from a set of auxiliary routers."""

    def logits(self, site: str, x_nD: torch.Tensor) -> torch.Tensor:
        """Auxiliary router logits (n, E) for router ``site`` (> 0 means selected)."""
        ...


@dataclass
class RouterRecord:
    """The inputs and batch decisions of one router site in one forward (detached).

    Attributes:
        site: router site name, e.g. ``layer3_ffn_text`` or ``layer2_mod``.
        x_nD: the router's input tokens.
        target_nE: 1.0 where the batch top-k selected (token, expert), else 0.0.
    """

    site: str
    x_nD: torch.Tensor
    target_nE: torch.Tensor


@dataclass
class RoutingContext:
    """Routing mode, optional decision trace, and the auxiliary losses and metrics of a forward.

    Attributes:
        mode: "batch" (batch-level top-k) or "causal" (auxiliary routers decide per token).
        aux_routers: required in causal mode for expert-choice and MoD sites.
        trace: when a list, every batch-mode router appends a :class:`RouterRecord`.
        aux_losses: named, already weighted, losses to add to the objective.
        metrics: named detached scalars (tensors: no device-to-host sync here).
    """

    mode: RoutingMode = "batch"
    aux_routers: AuxRouterLookup | None = None
    trace: list[RouterRecord] | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    _sums: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("batch", "causal"):
            raise ValueError(f"routing_mode must be 'batch' or 'causal', got {self.mode!r}")

    @property
    def causal(self) -> bool:
        return self.mode == "causal"

    def causal_selection(self, site: str, x_nD: torch.Tensor) -> torch.Tensor:
        """Per-token decisions of the auxiliary router of ``site``: bool (n, E), score > 0.5."""
        if self.aux_routers is None:
            raise ValueError("routing_mode='causal' needs aux_routers (sparsefusion train-aux)")
        return self.aux_routers.logits(site, x_nD) > 0  # sigmoid(z) > 0.5  <=>  z > 0

    def record(self, site: str, x_nD: torch.Tensor, selected_nE: torch.Tensor) -> None:
        """Keep the batch decisions of ``site`` when tracing (auxiliary-router targets)."""
        if self.trace is not None:
            self.trace.append(RouterRecord(site, x_nD.detach(), selected_nE.detach().float()))

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        """Accumulate a weighted auxiliary loss (summed over layers and groups)."""
        self.aux_losses[name] = self.aux_losses[name] + value if name in self.aux_losses else value

    def add_ratio(self, name: str, numerator: torch.Tensor, denominator: float) -> None:
        """Accumulate ``sum(numerator) / sum(denominator)`` over sites under ``name``."""
        num, den = self._sums.setdefault(name, [torch.zeros(()), torch.zeros(())])[:2]
        self._sums[name] = [
            num.to(numerator.device) + numerator.detach().float(),
            den + denominator,
        ]

    def finish_metrics(self) -> dict[str, torch.Tensor]:
        """The metrics, with the accumulated ratios resolved."""
        out = dict(self.metrics)
        for name, (num, den) in self._sums.items():
            out[name] = num / den.clamp(min=1).to(num.device)
        return out
