"""The routing plan: which group (tower or expert group) every flattened position belongs to.

One plan is built per batch, on the host, from the modality ids and a modality-to-group map. It
holds a stable sort permutation of the flattened positions by group, its inverse, the per-group
counts as Python ints and int32 cumulative offsets for grouped matmuls. Every layer reads the plan;
nothing in the layer loop recomputes it or asks the device for a count.

A *per-token* plan (:func:`per_token_plan`) is the static-shape form of the same primitive, for a
decode step of a few tokens whose groups live on the device: nothing is sorted and no count is
known on the host; every layer applies each position's group by selection instead of slicing
(``TowerLinear`` computes every group's projection of the few rows and gathers), so the step has
the same shapes and operations whatever the tokens' modalities are.

Shape legend: N = flattened positions (B*T), G = groups, D = feature width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingPlan:
    """Sorted layout of N positions into G contiguous groups.

    Attributes:
        perm_N: sorted slot -> original position (``x_sorted = x.index_select(0, perm_N)``).
        inv_perm_N: original position -> sorted slot (``x = x_sorted.index_select(0, inv_perm_N)``).
        group_N: the group of every original position.
        counts: number of positions per group (host ints, length G).
        offsets_G: int32 cumulative ends of the groups in sorted order (for grouped matmuls).
        is_identity: True when sorting changes nothing (one group, or already sorted input).
        per_token: the static form (no sort, no host counts; ``counts`` is empty).
    """

    perm_N: torch.Tensor
    inv_perm_N: torch.Tensor
    group_N: torch.Tensor
    counts: tuple[int, ...]
    offsets_G: torch.Tensor
    is_identity: bool
    per_token: bool = False
    groups: int = 0  # G of a per-token plan (a sorted plan's G is len(counts))

    @property
    def num_groups(self) -> int:
        return self.groups if self.per_token else len(self.counts)

    @property
    def num_positions(self) -> int:
        return self.group_N.numel() if self.per_token else sum(self.counts)

    def slices(self) -> list[tuple[int, int]]:
        """(start, end) of each group in sorted order, as host ints."""
        if self.per_token:
            raise ValueError("a per-token plan has no host slices (select per position)")
        out, start = [], 0
        for c in self.counts:
            out.append((start, start + c))
            start += c
        return out

    def sort(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Original order -> group-sorted order (along dim 0)."""
        return x_ND if self.is_identity else permute_rows(x_ND, self.perm_N, self.inv_perm_N)

    def unsort(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Group-sorted order -> original order (along dim 0)."""
        return x_ND if self.is_identity else permute_rows(x_ND, self.inv_perm_N, self.perm_N)

    def to(self, device: torch.device | str) -> RoutingPlan:
        """Copy the index tensors to ``device`` (host counts stay on the host)."""
        return RoutingPlan(
            perm_N=self.perm_N.to(device, non_blocking=True),
            inv_perm_N=self.inv_perm_N.to(device, non_blocking=True),
            group_N=self.group_N.to(device, non_blocking=True),
            counts=self.counts,
            offsets_G=self.offsets_G.to(device, non_blocking=True),
            is_identity=self.is_identity,
            per_token=self.per_token,
            groups=self.groups,
        )

    def subset(self, index_K: torch.Tensor, counts: tuple[int, ...] | None = None) -> RoutingPlan:
        """The plan of a subset of positions (Mixture-of-Depths), given original-order indices.

        ``index_K`` must be on the host unless ``counts`` (per-group sizes of the subset) is given,
        so that building the sub-plan never forces a device-to-host sync.
        """
        group_K = self.group_N.index_select(0, index_K)
        if counts is None:
            if group_K.is_cuda:
                raise ValueError("subset() of a device tensor needs host counts")
            return build_plan(group_K, self.num_groups)
        return _plan_from_counts(group_K, counts)


class _PermuteRows(torch.autograd.Function):
    """``x.index_select(0, index)`` for a permutation ``index``, whose backward is a gather too.

    The backward of a plain ``index_select`` zero-fills the input gradient and scatter-adds into
    it; for a permutation the gradient is the output gradient gathered by the inverse.
    """

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, index_N: torch.Tensor, inverse_N: torch.Tensor):
        ctx.save_for_backward(inverse_N)
        return x_ND.index_select(0, index_N)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        (inverse_N,) = ctx.saved_tensors
        return grad_ND.index_select(0, inverse_N), None, None


def permute_rows(
    x_ND: torch.Tensor, index_N: torch.Tensor, inverse_N: torch.Tensor
) -> torch.Tensor:
    """Rows of ``x_ND`` in the order of the permutation ``index_N`` (``inverse_N`` its inverse).

    Same values as ``x_ND.index_select(0, index_N)``; under autograd the backward gathers the
    gradient with ``inverse_N`` instead of scatter-adding it.
    """
    if not (x_ND.requires_grad and torch.is_grad_enabled()):
        return x_ND.index_select(0, index_N)
    return _PermuteRows.apply(x_ND, index_N, inverse_N)


def per_token_plan(group_N: torch.Tensor, num_groups: int) -> RoutingPlan:
    """The static-shape plan of a few positions whose groups may live on the device.

    Nothing is sorted (the permutation is the identity) and nothing is read on the host, so a
    compiled decode step keeps one graph whatever its tokens' modalities are.
    """
    group_N = group_N.reshape(-1).long()
    ident_N = torch.arange(group_N.numel(), device=group_N.device)
    empty = torch.zeros(0, dtype=torch.int32, device=group_N.device)
    return RoutingPlan(ident_N, ident_N, group_N, (), empty, True, True, num_groups)


def build_plan(group_N: torch.Tensor, num_groups: int) -> RoutingPlan:
    """Build a plan on the host from per-position group ids (any shape, flattened).

    Args:
        group_N: integer group id of every position, values in ``[0, num_groups)``.
        num_groups: number of groups G (groups may be empty).

    Returns:
        The routing plan. Call ``.to(device)`` before use on an accelerator.
    """
    if group_N.is_cuda:
        raise ValueError("build_plan runs on the host: pass CPU group ids")
    group_N = group_N.reshape(-1).long()
    if group_N.numel() and (int(group_N.min()) < 0 or int(group_N.max()) >= num_groups):
        raise ValueError(
            f"group ids must lie in [0, {num_groups}), got {group_N.unique().tolist()}"
        )
    counts = tuple(int(c) for c in torch.bincount(group_N, minlength=num_groups).tolist())
    return _plan_from_counts(group_N, counts)


def plan_from_counts(group_N: torch.Tensor, counts: tuple[int, ...]) -> RoutingPlan:
    """A plan from group ids on any device and their per-group counts (host ints, no sync)."""
    return _plan_from_counts(group_N, tuple(counts))


def _plan_from_counts(group_N: torch.Tensor, counts: tuple[int, ...]) -> RoutingPlan:
    perm_N = torch.sort(group_N, stable=True).indices
    inv_perm_N = torch.empty_like(perm_N)
    inv_perm_N[perm_N] = torch.arange(perm_N.numel(), device=perm_N.device)
    offsets_G = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    nonempty = sum(1 for c in counts if c > 0)
    # Only inspect the order on the host: on a device this would be a sync.
    identity = nonempty <= 1 or (
        not group_N.is_cuda and bool(torch.all(group_N[1:] >= group_N[:-1]))
    )
    return RoutingPlan(perm_N, inv_perm_N, group_N, counts, offsets_G.to(group_N.device), identity)
