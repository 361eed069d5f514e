"""The KV cache of incremental decoding: per layer, keys and values after projection and RoPE.

Every layer owns a preallocated (B, J, S, K) key and value buffer, the document and span id of
every cached slot, and per-row lengths kept on the host (so writing a step needs no device
sync). A forward over the next tokens of every row (``ForwardContext(cache=...)``) writes each
layer's new keys/values at slots ``length[b] ..`` of row b and attends over the cached prefix
and the step: query i of row b sees slot s iff s was written by now, holds the same document,
and s comes no later than the query (or both lie in one bidirectional span). ``counts[b]`` says
how many of row b's step tokens are real: they lead the row; the rest are filler (right padding
of a prefill, finished rows, a Mixture-of-Depths layer's unselected rows) that attends only to
filler and is never committed. A Mixture-of-Depths layer caches only the tokens it processed, so
its lengths differ from the other layers'.

``begin(counts, commit=False)`` runs a step against the cache without keeping it (the next step
overwrites the same slots): e.g. every denoising pass of an image span, then one committed pass.

Shape legend: B = rows, J = key/value heads, S = cache slots, K = head dim, H = query heads,
T = tokens of the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of every layer for B rows of at most ``capacity`` tokens.

    Args:
        num_layers: model layers.
        batch: rows B.
        capacity: slots S per row (the longest sequence the cache can hold).
        kv_heads: key/value heads J.
        head_dim: K.
        dtype: storage dtype (the model's activation dtype).
        device: storage device.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if batch < 1 or capacity < 1:
            raise ValueError(f"KVCache needs batch >= 1 and capacity >= 1 ({batch}, {capacity})")
        self.batch, self.capacity = batch, capacity
        # One slot more than the capacity: filler beyond a full row lands in that spare slot.
        self.layers = [
            LayerKV(self, batch, capacity + 1, kv_heads, head_dim, dtype, device)
            for _ in range(num_layers)
        ]
        self._counts: list[int] = [0] * batch
        self.commit = True
        self.memo: dict = {}

    def begin(self, counts: Sequence[int], *, commit: bool = True) -> None:
        """Declare the next forward: ``counts[b]`` real tokens lead row b; keep them or not."""
        if len(counts) != self.batch or any(c < 0 for c in counts):
            raise ValueError(f"counts must be {self.batch} non-negative ints, got {list(counts)}")
        self._counts = [int(c) for c in counts]
        self.commit = commit
        self.memo = {}

    def lengths(self, layer: int = 0) -> list[int]:
        """Committed tokens of every row at ``layer`` (host ints)."""
        return list(self.layers[layer].length)

    def layer(
        self, index: int, document_BT: torch.Tensor, span_BT: torch.Tensor | None
    ) -> LayerStep:
        """Layer ``index``'s cache bound to the step's tokens (called by the model)."""
        return LayerStep(self.layers[index], document_BT, span_BT, self._counts, shared=True)

    def reset(self) -> None:
        """Forget every cached token (the buffers are kept)."""
        for layer in self.layers:
            layer.length = [0] * self.batch


class LayerKV:
    """One layer's buffers and per-row lengths (see :class:`KVCache`)."""

    def __init__(self, owner: KVCache, B: int, S: int, J: int, K: int, dtype, device):
        self.owner = owner
        self.k_BJSK = torch.zeros(B, J, S, K, dtype=dtype, device=device)
        self.v_BJSK = torch.zeros(B, J, S, K, dtype=dtype, device=device)
        self.document_BS = torch.full((B, S), -1, dtype=torch.long, device=device)
        self.span_BS = torch.full((B, S), -1, dtype=torch.long, device=device)
        self.length = [0] * B

    def write_and_attend(
        self,
        q_BHTK: torch.Tensor,
        k_BJTK: torch.Tensor,
        v_BJTK: torch.Tensor,
        document_BT: torch.Tensor,
        span_BT: torch.Tensor | None,
        counts: Sequence[int],
        shared: bool = False,
    ) -> torch.Tensor:
        """Store the step's keys/values and attend (see the module doc for the rule).

        ``shared``: the step's own tokens (not a Mixture-of-Depths subset); every such layer
        holds the same tokens, so their index tensors and mask are built once per step.
        """
        T = q_BHTK.shape[2]
        S = self.k_BJSK.shape[2]
        need = max(n + c for n, c in zip(self.length, counts, strict=True))
        if need > S - 1:
            raise ValueError(f"KV cache full: a row would need {need} slots, capacity is {S - 1}")
        key = tuple(self.length)
        memo = self.owner.memo if shared else {}
        if key not in memo:
            memo[key] = _StepIndex.build(self.length, counts, T, document_BT, span_BT, S)
        idx = memo[key]
        self.k_BJSK[idx.row_BT, :, idx.slot_BT] = k_BJTK.transpose(1, 2).to(self.k_BJSK.dtype)
        self.v_BJSK[idx.row_BT, :, idx.slot_BT] = v_BJTK.transpose(1, 2).to(self.v_BJSK.dtype)
        self.document_BS[idx.row_BT, idx.slot_BT] = idx.doc_BT
        self.span_BS[idx.row_BT, idx.slot_BT] = idx.span_BT
        if idx.allowed_B1TS is None:  # the first layer of the step builds the mask
            idx.allowed_B1TS = idx.mask(self.document_BS, self.span_BS)
        used = idx.used
        k_BJSK, v_BJSK = self.k_BJSK[:, :, :used], self.v_BJSK[:, :, :used]
        o_BHTK = F.scaled_dot_product_attention(
            q_BHTK,
            k_BJSK.to(q_BHTK.dtype),
            v_BJSK.to(q_BHTK.dtype),
            attn_mask=idx.allowed_B1TS,
            enable_gqa=k_BJSK.shape[1] != q_BHTK.shape[1],
        )
        if self.owner.commit:
            self.length = [n + c for n, c in zip(self.length, counts, strict=True)]
        return o_BHTK


@dataclass
class _StepIndex:
    """Where one step's tokens go in a layer's cache, and the step's attention mask."""

    row_BT: torch.Tensor
    slot_BT: torch.Tensor
    doc_BT: torch.Tensor
    span_BT: torch.Tensor
    start_B: torch.Tensor
    used: int
    allowed_B1TS: torch.Tensor | None = None

    @staticmethod
    def build(length, counts, T, document_BT, span_BT, S: int) -> _StepIndex:
        device = document_BT.device
        B = len(length)
        start_B = torch.tensor(length, device=device)
        t_T = torch.arange(T, device=device)
        real_BT = t_T[None, :] < torch.tensor(list(counts), device=device)[:, None]
        span = torch.full_like(document_BT, -1) if span_BT is None else span_BT
        return _StepIndex(
            row_BT=torch.arange(B, device=device)[:, None].expand(B, T),
            slot_BT=(start_B[:, None] + t_T[None, :]).clamp(max=S - 1),  # filler past the end
            doc_BT=torch.where(real_BT, document_BT, -1),  # filler: its own "document"
            span_BT=torch.where(real_BT, span, -1),
            start_B=start_B,
            used=min(S, max(length) + T),
        )

    def mask(self, document_BS: torch.Tensor, span_BS: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, used): written, same document, and earlier or in the same span."""
        T = self.slot_BT.shape[1]
        s_S = torch.arange(self.used, device=document_BS.device)
        written_BS = s_S[None, :] < (self.start_B + T)[:, None]
        doc_BS, span_BS = document_BS[:, : self.used], span_BS[:, : self.used]
        same_doc_BTS = doc_BS[:, None, :] == self.doc_BT[:, :, None]
        earlier_BTS = s_S[None, None, :] <= self.slot_BT[:, :, None]
        q_span_BT1 = self.span_BT[:, :, None]
        same_span_BTS = (span_BS[:, None, :] == q_span_BT1) & (q_span_BT1 >= 0)
        allowed_BTS = written_BS[:, None, :] & same_doc_BTS & (earlier_BTS | same_span_BTS)
        return allowed_BTS[:, None]


class LayerStep:
    """A layer's cache bound to one step's tokens (the model's ``KVStep``)."""

    def __init__(
        self,
        layer: LayerKV,
        document_BT: torch.Tensor,
        span_BT: torch.Tensor | None,
        counts: Sequence[int],
        shared: bool = False,
    ):
        self._layer, self._document_BT, self._span_BT = layer, document_BT, span_BT
        self._counts, self._shared = list(counts), shared
        if len(self._counts) != document_BT.shape[0]:
            raise ValueError(
                f"cache step has {len(self._counts)} rows, the inputs {document_BT.shape[0]}"
            )

    def attend(
        self, q_BHTK: torch.Tensor, k_BJTK: torch.Tensor, v_BJTK: torch.Tensor
    ) -> torch.Tensor:
        return self._layer.write_and_attend(
            q_BHTK, k_BJTK, v_BJTK, self._document_BT, self._span_BT, self._counts, self._shared
        )

    def rebind(
        self, document_BT: torch.Tensor, span_BT: torch.Tensor | None, counts: list[int]
    ) -> LayerStep:
        return LayerStep(self._layer, document_BT, span_BT, counts)

    def real_BT(self) -> torch.Tensor:
        B, T = self._document_BT.shape
        device = self._document_BT.device
        count_B = torch.tensor(self._counts, device=device)
        return torch.arange(T, device=device)[None, :] < count_B[:, None]
