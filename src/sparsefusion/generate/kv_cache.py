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
        self.layers = [
            LayerKV(self, batch, capacity, kv_heads, head_dim, dtype, device)
            for _ in range(num_layers)
        ]
        self._counts: list[int] = [0] * batch
        self.commit = True

    def begin(self, counts: Sequence[int], *, commit: bool = True) -> None:
        """Declare the next forward: ``counts[b]`` real tokens lead row b; keep them or not."""
        if len(counts) != self.batch or any(c < 0 for c in counts):
            raise ValueError(f"counts must be {self.batch} non-negative ints, got {list(counts)}")
        self._counts = [int(c) for c in counts]
        self.commit = commit

    @property
    def step_counts(self) -> list[int]:
        return list(self._counts)

    def lengths(self, layer: int = 0) -> list[int]:
        """Committed tokens of every row at ``layer`` (host ints)."""
        return list(self.layers[layer].length)

    def layer(
        self, index: int, document_BT: torch.Tensor, span_BT: torch.Tensor | None
    ) -> LayerStep:
        """Layer ``index``'s cache bound to the step's tokens (called by the model)."""
        return LayerStep(self.layers[index], document_BT, span_BT, self._counts)

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
    ) -> torch.Tensor:
        """Store the step's keys/values and attend (see the module doc for the rule)."""
        B, _, T, _ = q_BHTK.shape
        S = self.k_BJSK.shape[2]
        end = [n + T for n in self.length]
        if max(end) > S:
            raise ValueError(f"KV cache full: a row would need {max(end)} slots, capacity is {S}")
        device = q_BHTK.device
        start_B = torch.tensor(self.length, device=device)
        count_B = torch.tensor(list(counts), device=device)
        t_T = torch.arange(T, device=device)
        slot_BT = start_B[:, None] + t_T[None, :]
        valid_BT = t_T[None, :] < count_B[:, None]
        doc_BT = torch.where(valid_BT, document_BT, -1)
        span_q_BT = torch.full_like(doc_BT, -1) if span_BT is None else span_BT
        span_q_BT = torch.where(valid_BT, span_q_BT, -1)
        row_BT = torch.arange(B, device=device)[:, None].expand(B, T)
        self.k_BJSK[row_BT, :, slot_BT] = k_BJTK.transpose(1, 2).to(self.k_BJSK.dtype)
        self.v_BJSK[row_BT, :, slot_BT] = v_BJTK.transpose(1, 2).to(self.v_BJSK.dtype)
        self.document_BS[row_BT, slot_BT] = doc_BT
        self.span_BS[row_BT, slot_BT] = span_q_BT
        used = max(end)
        s_S = torch.arange(used, device=device)
        written_BS = s_S[None, :] < (start_B + T)[:, None]
        doc_BS, span_BS = self.document_BS[:, :used], self.span_BS[:, :used]
        same_doc_BTS = doc_BS[:, None, :] == doc_BT[:, :, None]
        earlier_BTS = s_S[None, None, :] <= slot_BT[:, :, None]
        same_span_BTS = (span_BS[:, None, :] == span_q_BT[:, :, None]) & (span_q_BT >= 0)[..., None]
        allowed_BTS = written_BS[:, None, :] & same_doc_BTS & (earlier_BTS | same_span_BTS)
        k_BJSK, v_BJSK = self.k_BJSK[:, :, :used], self.v_BJSK[:, :, :used]
        o_BHTK = F.scaled_dot_product_attention(
            q_BHTK,
            k_BJSK.to(q_BHTK.dtype),
            v_BJSK.to(q_BHTK.dtype),
            attn_mask=allowed_BTS[:, None],
            enable_gqa=k_BJSK.shape[1] != q_BHTK.shape[1],
        )
        if self.owner.commit:
            self.length = [n + c for n, c in zip(self.length, counts, strict=True)]
        return o_BHTK


class LayerStep:
    """A layer's cache bound to one step's tokens (the model's ``KVStep``)."""

    def __init__(
        self,
        layer: LayerKV,
        document_BT: torch.Tensor,
        span_BT: torch.Tensor | None,
        counts: Sequence[int],
    ):
        self._layer, self._document_BT, self._span_BT = layer, document_BT, span_BT
        self._counts = list(counts)
        if len(self._counts) != document_BT.shape[0]:
            raise ValueError(
                f"cache step has {len(self._counts)} rows, the inputs {document_BT.shape[0]}"
            )

    def attend(
        self, q_BHTK: torch.Tensor, k_BJTK: torch.Tensor, v_BJTK: torch.Tensor
    ) -> torch.Tensor:
        return self._layer.write_and_attend(
            q_BHTK, k_BJTK, v_BJTK, self._document_BT, self._span_BT, self._counts
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
