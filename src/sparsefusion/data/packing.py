"""Greedy packing of encoded documents into fixed-length training rows (as in nanoGPT / lingua).

Encoded documents (``encoded.py``) are concatenated into one stream. Every position carries its
next-token target, fixed when its document enters the stream: the next id of the same
document, ignored at the document's end and at or into a placeholder of a continuous span. A
row takes the next ``seq_len`` positions of the stream, so a document longer than a row simply
continues in the next row (its positions keep counting) and no target is lost at the cut.

A continuous span (an image's ``BOI p_1 .. p_n EOI``) never crosses a row: when it does not fit
in what is left of a row, the rest of the row is padding (pad ids, ignored targets, a document
of its own, positions from 0; counted) and the span starts the next row. A batch with spans
carries their values (``latents_IZhw``), the slot of each span's first placeholder, ``span_BT``
(one id per span inside its row: its placeholders attend to each other) and whether a span
precedes its caption. Without continuous spans nothing is padded and ``span_BT`` is None.

Shape legend: B = rows, T = seq_len, N = positions in the buffer, I = spans in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sparsefusion.data.batch import IGNORE_INDEX, Batch
from sparsefusion.data.encoded import Encoded

_FIELDS = ("ids", "modality", "position", "document")  # what a state holds per position


@dataclass
class PackBuffer:
    """The not-yet-emitted part of the stream.

    Attributes:
        ids_N: unified-vocabulary ids.
        modality_N: modality index of each id.
        position_N: position of each id inside its document.
        document_N: a stream-unique id of each id's document (the source index on this rank).
        target_N: next-token target of each position (``IGNORE_INDEX``: none).
        target_modality_N: modality of the target (-1: none).
        frame_N: offset inside its continuous span's frame (BOI .. EOI), -1 outside one.
        value_N: key in ``values`` of the span a placeholder belongs to, -1 elsewhere.
        values: key -> (value, early) of the continuous spans in the buffer.
    """

    ids_N: torch.Tensor
    modality_N: torch.Tensor
    position_N: torch.Tensor
    document_N: torch.Tensor
    target_N: torch.Tensor
    target_modality_N: torch.Tensor
    frame_N: torch.Tensor
    value_N: torch.Tensor
    values: dict[int, tuple[torch.Tensor, bool]] = field(default_factory=dict)
    next_key: int = 0

    @classmethod
    def empty(cls) -> PackBuffer:
        """A buffer with no positions."""
        return cls(*(torch.zeros(0, dtype=torch.long) for _ in range(8)))

    def __len__(self) -> int:
        return self.ids_N.numel()

    def _columns(self) -> list[torch.Tensor]:
        return [self.ids_N, self.modality_N, self.position_N, self.document_N, self.target_N,
                self.target_modality_N, self.frame_N, self.value_N]  # fmt: skip

    def _set_columns(self, columns: list[torch.Tensor]) -> None:
        (self.ids_N, self.modality_N, self.position_N, self.document_N, self.target_N,
         self.target_modality_N, self.frame_N, self.value_N) = columns  # fmt: skip

    def extend(
        self, encoded: list[Any], doc_uids: list[int], starts: list[int] | None = None
    ) -> None:
        """Append documents to the stream.

        Args:
            encoded: per document, an :class:`Encoded` or (global ids, modality index per id).
            doc_uids: per document, an id unique within the stream (consecutive documents must
                differ; they mark the boundaries).
            starts: per document, its first position to append (a restored document continues
                where it stopped; default 0).
        """
        if not encoded:
            return
        docs = [e if isinstance(e, Encoded) else Encoded(*e) for e in encoded]
        ids, mods, lengths = [], [], []
        for doc, uid in zip(docs, doc_uids, strict=True):
            if len(doc.ids) != len(doc.modalities):
                raise ValueError(
                    f"document {uid}: {len(doc.ids)} ids but {len(doc.modalities)} modalities"
                )
            ids.append(np.asarray(doc.ids, dtype=np.int64))
            mods.append(np.asarray(doc.modalities, dtype=np.int64))
            lengths.append(len(doc.ids))
        ids_N, mods_N = np.concatenate(ids), np.concatenate(mods)
        pos_N = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
        doc_N = np.repeat(np.asarray(doc_uids, dtype=np.int64), lengths)
        first_key = self.next_key
        frame_N, value_N = self._spans(docs, lengths)
        # The target of a position: the next id of its document, unless either is a placeholder.
        free_N = value_N < 0
        ok = (doc_N[1:] == doc_N[:-1]) & free_N[1:] & free_N[:-1]
        target_N = np.full_like(ids_N, IGNORE_INDEX)
        target_N[:-1] = np.where(ok, ids_N[1:], IGNORE_INDEX)
        tmod_N = np.full_like(ids_N, -1)
        tmod_N[:-1] = np.where(ok, mods_N[1:], -1)
        new = [ids_N, mods_N, pos_N, doc_N, target_N, tmod_N, frame_N, value_N]
        if starts is not None:
            keep = pos_N >= np.repeat(np.asarray(starts, dtype=np.int64), lengths)
            new = [a[keep] for a in new]
            kept = set(new[-1][new[-1] >= 0].tolist())
            for key in range(first_key, self.next_key):
                if key not in kept:
                    del self.values[key]
        self._set_columns(
            [torch.cat([o, torch.from_numpy(n)]) for o, n in zip(self._columns(), new, strict=True)]
        )

    def _spans(self, docs: list[Encoded], lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """``frame_N`` and ``value_N`` of new documents; registers their span values."""
        total = sum(lengths)
        frame_N = np.full(total, -1, dtype=np.int64)
        value_N = np.full(total, -1, dtype=np.int64)
        offset = 0
        for doc, n in zip(docs, lengths, strict=True):
            for span in doc.spans:
                lo, hi = offset + span.start, offset + span.stop
                frame_N[lo:hi] = np.arange(hi - lo)
                value_N[lo + 1 : hi - 1] = self.next_key
                self.values[self.next_key] = (span.value, span.early)
                self.next_key += 1
            offset += n
        return frame_N, value_N

    def cut(self, num_rows: int, seq_len: int) -> list[tuple[int, int]] | None:
        """The buffer extents ``(start, stop)`` of the next ``num_rows`` rows (a row shorter
        than ``seq_len`` is padded), or None while the buffer cannot fill them.

        Raises:
            ValueError: when a continuous span is longer than a row.
        """
        rows, start, n = [], 0, len(self)
        for _ in range(num_rows):
            stop = start + seq_len
            if stop > n:
                return None
            if stop < n and int(self.frame_N[stop]) > 0:  # the cut would split a span
                stop -= int(self.frame_N[stop])
                if stop == start:
                    raise ValueError(
                        f"data.seq_len={seq_len} cannot hold one continuous span (an image: its "
                        "patches plus BOI and EOI); raise data.seq_len or model.patch_size"
                    )
            rows.append((start, stop))
            start = stop
        return rows

    def take(self, rows: list[tuple[int, int]], seq_len: int, pad_id: int = 0) -> Batch:
        """The batch of the rows :meth:`cut` chose; drops their positions from the buffer."""
        B, T = len(rows), seq_len
        used_B = torch.tensor([stop - start for start, stop in rows])
        idx_BT = rows[0][0] + torch.arange(B * T).view(B, T)
        pad_BT = None
        if bool((used_B < T).any()):  # padded rows: gather row by row, -1 marks padding
            idx_BT = torch.full((B, T), -1, dtype=torch.long)
            for r, (start, stop) in enumerate(rows):
                idx_BT[r, : stop - start] = torch.arange(start, stop)
            pad_BT = idx_BT < 0
            idx_BT = idx_BT.clamp_min(0)

        def get(column: torch.Tensor, fill: Any) -> torch.Tensor:
            out = column[idx_BT]
            return out if pad_BT is None else torch.where(pad_BT, fill, out)

        position_BT = get(self.position_N, 0)
        if pad_BT is not None:  # padding counts its positions from 0
            position_BT = torch.where(pad_BT, torch.arange(T) - used_B[:, None], position_BT)
        uid_BT = get(self.document_N, -1)  # padding: a document of its own
        change_BT = torch.zeros_like(uid_BT)
        change_BT[:, 1:] = (uid_BT[:, 1:] != uid_BT[:, :-1]).long()
        batch = Batch(
            tokens_BT=get(self.ids_N, pad_id),
            targets_BT=get(self.target_N, IGNORE_INDEX),
            modality_BT=get(self.modality_N, 0),
            target_modality_BT=get(self.target_modality_N, -1),
            position_BT=position_BT,
            document_BT=change_BT.cumsum(dim=1),
        )
        self._add_spans(batch, get(self.value_N, -1))
        keep = rows[-1][1]
        self._set_columns([c[keep:].clone() for c in self._columns()])
        return batch

    def _add_spans(self, batch: Batch, value_BT: torch.Tensor) -> None:
        """Fill the batch's span fields from the keys of its placeholders (and forget them)."""
        flat_N = value_BT.reshape(-1)
        is_span_N = flat_N >= 0
        if not bool(is_span_N.any()):
            return
        new_N = is_span_N.clone()
        new_N[1:] &= flat_N[1:] != flat_N[:-1]
        slot_I = new_N.nonzero().squeeze(1)
        keys = flat_N[slot_I].tolist()
        first_B = torch.where(value_BT >= 0, value_BT, flat_N.max() + 1).amin(dim=1, keepdim=True)
        batch.span_BT = torch.where(value_BT >= 0, value_BT - first_B, -1)
        batch.latents_IZhw = torch.stack([self.values[k][0] for k in keys]).float()
        batch.image_slot_I = slot_I
        batch.image_early_I = torch.tensor([self.values[k][1] for k in keys], dtype=torch.bool)
        for k in keys:
            del self.values[k]

    def snapshot(self) -> dict[str, Any]:
        """The state as of now, cheaply (the tensors are shared, never mutated); turn it into
        :meth:`state_dict`'s form with :func:`snapshot_state`."""
        out: dict[str, Any] = dict(zip(_FIELDS, self._columns()[:4], strict=True))
        if self.values:  # documents whose span values a restore encodes again
            out["values_of"] = torch.unique(self.document_N[self.value_N >= 0]).tolist()
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable contents (span values are not saved: their documents are named in
        ``values_of`` and encoded again on restore)."""
        return snapshot_state(self.snapshot())

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PackBuffer:
        """The positions of :meth:`state_dict` (without the span values of ``values_of``)."""
        missing = [k for k in _FIELDS if k not in state]
        if missing:
            raise ValueError(f"pack buffer state is missing {missing}")
        lengths = {len(state[k]) for k in _FIELDS}
        if len(lengths) != 1:
            raise ValueError(f"pack buffer state has fields of different lengths {sorted(lengths)}")
        buf = cls.empty()
        buf.append_positions(*(torch.tensor(state[k], dtype=torch.long) for k in _FIELDS))
        return buf

    def append_positions(self, ids_N, modality_N, position_N, document_N) -> None:
        """Append positions of documents without continuous spans (as a state holds them: the
        last one ends its document)."""
        ok = document_N[1:] == document_N[:-1]
        target_N = torch.full_like(ids_N, IGNORE_INDEX)
        target_N[:-1] = torch.where(ok, ids_N[1:], IGNORE_INDEX)
        tmod_N = torch.full_like(ids_N, -1)
        tmod_N[:-1] = torch.where(ok, modality_N[1:], -1)
        none_N = torch.full_like(ids_N, -1)
        new = [ids_N, modality_N, position_N, document_N, target_N, tmod_N, none_N, none_N]
        self._set_columns([torch.cat([o, n]) for o, n in zip(self._columns(), new, strict=True)])


def snapshot_state(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of a :meth:`PackBuffer.snapshot`."""
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in snapshot.items()}


def buffered_positions(state: dict[str, Any]) -> int:
    """Positions held by a buffer state (0 for the Transfusion loader's older format)."""
    return len(state.get("ids", []))
