"""The KV cache of incremental decoding: per layer, keys and values after projection and RoPE.

Every layer owns a preallocated (B, J, S, K) key and value buffer, the document and span id of
every slot, and per-row lengths as a DEVICE tensor, so a step's shapes never depend on how much
a row holds: the same code serves an eager step (a prefill of ragged prompts, an image span)
and the static steps (one token per row, ``static.py``; an image span's fixed block of patches,
``static_span.py``; each compiled once per batch size).

A forward over the next tokens of every row (``ForwardContext(cache=...)``) writes each layer's
new keys/values and attends over the cached prefix and the step. Which of the step's tokens a
layer keeps is a boolean ``write_BT``: the real tokens of the step (``counts[b]`` leading ones
in an eager step; the rest is filler: right padding, finished rows), and at a
Mixture-of-Depths layer only the real tokens its router selected, so that layer's lengths differ
from the other layers'. Row b's kept tokens go to slots ``length[b], length[b] + 1, ...`` in
order; tokens not kept go to the spare slot S - 1 (never visible to a kept token). Query i of
row b sees slot s iff s is written by now, holds the same document, and comes no later than the
query's own slot (or both lie in one bidirectional span). A token that is not kept sees slot 0
only: its output is discarded, and it must not be a fully masked (NaN) row.

``begin(..., commit=False)`` runs a step against the cache without keeping it (lengths do not
advance; the next step overwrites the same slots): e.g. every denoising pass of an image span.
Nothing here reads a device value on the host; :meth:`KVCache.lengths` (diagnostics) does.

Shape legend: B = rows, J = key/value heads, S = cache slots, K = head dim, H = query heads,
T = tokens of the step, L = layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of every layer for B rows of at most ``capacity`` tokens.

    Args:
        num_layers: model layers L.
        batch: rows B.
        capacity: slots per row (the longest sequence the cache can hold); S = capacity + 1.
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
        S = capacity + 1  # one spare slot: tokens a layer does not keep land there
        self.length_LB = torch.zeros(num_layers, batch, dtype=torch.long, device=device)
        self.layers = [
            LayerKV(self, i, batch, S, kv_heads, head_dim, dtype, device) for i in range(num_layers)
        ]
        self.commit = True
        self.used = S
        self._counts: Sequence[int] | None = None
        self._write_BT: torch.Tensor | None = None
        self._shared: _StepIndex | None = None

    def begin(self, counts: Sequence[int], *, commit: bool = True, used: int | None = None) -> None:
        """Declare an eager step: ``counts[b]`` real tokens lead row b; keep them or not.

        ``used``: slots the step's attention reads (a host bound on every row's length after
        the step, e.g. from the decoder's own bookkeeping; default: all).
        """
        if len(counts) != self.batch or any(c < 0 for c in counts):
            raise ValueError(f"counts must be {self.batch} non-negative ints, got {list(counts)}")
        self._counts, self._write_BT = [int(c) for c in counts], None
        self._start(commit, used)

    def begin_static(self, write_BT: torch.Tensor, *, commit: bool = True) -> None:
        """Declare a static step: ``write_BT`` (device bool) marks the tokens to keep."""
        self._counts, self._write_BT = None, write_BT
        self._start(commit, None)

    def _start(self, commit: bool, used: int | None) -> None:
        S = self.capacity + 1
        self.commit = commit
        self.used = S if used is None else max(1, min(S, used))
        self._shared = None

    def lengths(self, layer: int = 0) -> list[int]:
        """Committed tokens of every row at ``layer`` (reads the device: diagnostics only)."""
        return self.length_LB[layer].tolist()

    def layer(
        self, index: int, document_BT: torch.Tensor, span_BT: torch.Tensor | None
    ) -> LayerStep:
        """Layer ``index``'s cache bound to the step's tokens (called by the model)."""
        if self._write_BT is None:  # an eager step: built once, at its first layer
            assert self._counts is not None, "begin() before the forward"
            self._write_BT = leading(self._counts, document_BT.shape[1], document_BT.device)
        return LayerStep(self.layers[index], document_BT, span_BT, self._write_BT, shared=True)

    def reset(self) -> None:
        """Forget every cached token (the buffers are kept)."""
        self.length_LB.zero_()


def leading(counts: Sequence[int], T: int, device) -> torch.Tensor:
    """Bool (B, T): True at the ``counts[b]`` leading tokens of row b."""
    count_B = torch.tensor(list(counts), device=device)
    return torch.arange(T, device=device)[None, :] < count_B[:, None]


class LayerKV:
    """One layer's buffers; its lengths are row ``index`` of the cache's (L, B) tensor."""

    def __init__(self, owner: KVCache, index: int, B: int, S: int, J: int, K: int, dtype, device):
        self.owner, self.index = owner, index
        self.k_BJSK = torch.zeros(B, J, S, K, dtype=dtype, device=device)
        self.v_BJSK = torch.zeros(B, J, S, K, dtype=dtype, device=device)
        self.document_BS = torch.full((B, S), -1, dtype=torch.long, device=device)
        self.span_BS = torch.full((B, S), -1, dtype=torch.long, device=device)

    def write_and_attend(
        self,
        q_BHTK: torch.Tensor,
        k_BJTK: torch.Tensor,
        v_BJTK: torch.Tensor,
        document_BT: torch.Tensor,
        span_BT: torch.Tensor | None,
        write_BT: torch.Tensor,
        shared: bool = False,
    ) -> torch.Tensor:
        """Store the kept tokens' keys/values and attend (see the module doc for the rule).

        ``shared``: the step's own tokens (not a Mixture-of-Depths subset); every such layer
        keeps the same tokens at the same slots, so their index and mask are built once.
        """
        owner = self.owner
        length_B = owner.length_LB[self.index]
        idx = owner._shared if shared else None
        if idx is None:
            idx = _StepIndex.build(length_B, write_BT, document_BT, span_BT, owner.used,
                                   self.k_BJSK.shape[2])  # fmt: skip
        row_BT, slot_BT = idx.row_BT, idx.slot_BT
        self.k_BJSK[row_BT, :, slot_BT] = k_BJTK.transpose(1, 2).to(self.k_BJSK.dtype)
        self.v_BJSK[row_BT, :, slot_BT] = v_BJTK.transpose(1, 2).to(self.v_BJSK.dtype)
        self.document_BS[row_BT, slot_BT] = idx.doc_BT
        self.span_BS[row_BT, slot_BT] = idx.span_BT
        if idx.allowed_B1TS is None:  # the first layer of the step builds the mask
            idx.allowed_B1TS = idx.mask(self.document_BS, self.span_BS)
            if shared:
                owner._shared = idx
        used = owner.used
        k_BJSK, v_BJSK = self.k_BJSK[:, :, :used], self.v_BJSK[:, :, :used]
        o_BHTK = F.scaled_dot_product_attention(
            q_BHTK,
            k_BJSK.to(q_BHTK.dtype),
            v_BJSK.to(q_BHTK.dtype),
            attn_mask=idx.allowed_B1TS,
            enable_gqa=k_BJSK.shape[1] != q_BHTK.shape[1],
        )
        if owner.commit:
            length_B.copy_(idx.new_length_B)
        return o_BHTK


class _StepIndex:
    """Where one step's kept tokens go in a layer's cache, and the step's attention mask."""

    def __init__(self, slot_BT, doc_BT, span_BT, write_BT, new_length_B, used):
        B, T = slot_BT.shape
        self.row_BT = torch.arange(B, device=slot_BT.device)[:, None].expand(B, T)
        self.slot_BT, self.doc_BT, self.span_BT = slot_BT, doc_BT, span_BT
        self.write_BT, self.new_length_B, self.used = write_BT, new_length_B, used
        self.allowed_B1TS: torch.Tensor | None = None

    @staticmethod
    def build(length_B, write_BT, document_BT, span_BT, used: int, S: int) -> _StepIndex:
        rank_BT = write_BT.long().cumsum(1)
        slot_BT = torch.where(write_BT, length_B[:, None] + rank_BT - 1, S - 1)
        span = torch.full_like(document_BT, -1) if span_BT is None else span_BT
        return _StepIndex(
            slot_BT=slot_BT,
            doc_BT=torch.where(write_BT, document_BT, -1),
            span_BT=torch.where(write_BT, span, -1),
            write_BT=write_BT,
            new_length_B=length_B + rank_BT[:, -1],
            used=used,
        )

    def mask(self, document_BS: torch.Tensor, span_BS: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, used): written, same document, and earlier or in the same span."""
        s_S = torch.arange(self.used, device=document_BS.device)
        written_BS = s_S[None, :] < self.new_length_B[:, None]
        doc_BS, span_BS = document_BS[:, : self.used], span_BS[:, : self.used]
        same_doc_BTS = doc_BS[:, None, :] == self.doc_BT[:, :, None]
        earlier_BTS = s_S[None, None, :] <= self.slot_BT[:, :, None]
        q_span_BT1 = self.span_BT[:, :, None]
        same_span_BTS = (span_BS[:, None, :] == q_span_BT1) & (q_span_BT1 >= 0)
        allowed_BTS = written_BS[:, None, :] & same_doc_BTS & (earlier_BTS | same_span_BTS)
        # A token not kept sees slot 0 only (its output is discarded; no fully masked row).
        allowed_BTS = torch.where(self.write_BT[:, :, None], allowed_BTS, s_S == 0)
        return allowed_BTS[:, None]


class LayerStep:
    """A layer's cache bound to one step's tokens (the model's ``KVStep``)."""

    def __init__(
        self,
        layer: LayerKV,
        document_BT: torch.Tensor,
        span_BT: torch.Tensor | None,
        write_BT: torch.Tensor,
        shared: bool = False,
    ):
        if write_BT.shape != document_BT.shape:
            raise ValueError(
                f"cache step keeps {tuple(write_BT.shape)} tokens, the inputs are "
                f"{tuple(document_BT.shape)}"
            )
        self._layer, self._document_BT, self._span_BT = layer, document_BT, span_BT
        self._write_BT, self._shared = write_BT, shared

    def attend(
        self, q_BHTK: torch.Tensor, k_BJTK: torch.Tensor, v_BJTK: torch.Tensor
    ) -> torch.Tensor:
        return self._layer.write_and_attend(
            q_BHTK, k_BJTK, v_BJTK, self._document_BT, self._span_BT, self._write_BT,
            self._shared,
        )  # fmt: skip

    def rebind(
        self, document_BT: torch.Tensor, span_BT: torch.Tensor | None, counts: list[int]
    ) -> LayerStep:
        write_BT = leading(counts, document_BT.shape[1], document_BT.device)
        return LayerStep(self._layer, document_BT, span_BT, write_BT)

    def gated(self, keep_BT: torch.Tensor) -> LayerStep:
        """The same tokens, of which this layer keeps only ``keep_BT`` (a MoD selection)."""
        return LayerStep(self._layer, self._document_BT, self._span_BT, self._write_BT & keep_BT)

    def real_BT(self) -> torch.Tensor:
        return self._write_BT
