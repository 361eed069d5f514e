"""Greedy packing of encoded documents into fixed-length training rows (as in nanoGPT / lingua).

Encoded documents are concatenated into one stream. A row reads ``seq_len + 1`` stream tokens:
inputs are ``row[:-1]``, targets ``row[1:]``, and the next row starts where this row's inputs
ended, so the last token of a row is the first input of the next. Every stream token is an input
exactly once and a target exactly once (the very first token excepted). Targets that belong to
another document than their input (across a document boundary) are ignored. A document longer
than a row simply continues in the next row, and its positions keep counting.

Shape legend: B = rows, T = seq_len (inputs per row), S = seq_len + 1 (stream tokens per row),
N = tokens in the buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparsefusion.data.batch import IGNORE_INDEX, Batch

_FIELDS = ("ids", "modality", "position", "document")


@dataclass
class PackBuffer:
    """The not-yet-emitted part of the token stream.

    Attributes:
        ids_N: unified-vocabulary ids.
        modality_N: modality index of each id.
        position_N: position of each id inside its document.
        document_N: a stream-unique id of each id's document (the source index on this rank).
    """

    ids_N: torch.Tensor
    modality_N: torch.Tensor
    position_N: torch.Tensor
    document_N: torch.Tensor

    @classmethod
    def empty(cls) -> PackBuffer:
        """A buffer with no tokens."""
        z = torch.zeros(0, dtype=torch.long)
        return cls(z, z.clone(), z.clone(), z.clone())

    def __len__(self) -> int:
        return self.ids_N.numel()

    def extend(self, encoded: list[tuple[list[int], list[int]]], doc_uids: list[int]) -> None:
        """Append whole documents to the stream.

        Args:
            encoded: per document, (global ids, modality index per id): lists or arrays.
            doc_uids: per document, an id unique within the stream (consecutive documents must
                differ; they mark the boundaries).
        """
        ids, mods, lengths = [], [], []
        for (doc_ids, doc_mods), uid in zip(encoded, doc_uids, strict=True):
            if len(doc_ids) != len(doc_mods):
                raise ValueError(
                    f"document {uid}: {len(doc_ids)} ids but {len(doc_mods)} modalities"
                )
            ids.append(np.asarray(doc_ids, dtype=np.int64))
            mods.append(np.asarray(doc_mods, dtype=np.int64))
            lengths.append(len(doc_ids))
        if not ids:
            return
        pos = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
        docs = np.repeat(np.asarray(doc_uids, dtype=np.int64), lengths)
        new = [torch.from_numpy(v) for v in (np.concatenate(ids), np.concatenate(mods), pos, docs)]
        old = [self.ids_N, self.modality_N, self.position_N, self.document_N]
        self.ids_N, self.modality_N, self.position_N, self.document_N = (
            torch.cat([o, n]) for o, n in zip(old, new, strict=True)
        )

    def take_rows(self, num_rows: int, seq_len: int) -> Batch:
        """Cut ``num_rows`` rows of ``seq_len`` inputs and drop the consumed inputs from the buffer.

        Raises:
            ValueError: when fewer than ``num_rows * seq_len + 1`` tokens are buffered.
        """
        need = num_rows * seq_len + 1
        if len(self) < need:
            raise ValueError(f"buffer holds {len(self)} tokens, {need} needed")
        # Row r covers stream positions r*T .. r*T + T (inclusive): S = T + 1 tokens.
        idx_BS = torch.arange(num_rows)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
        batch = pack_rows(
            self.ids_N[idx_BS],
            self.modality_N[idx_BS],
            self.position_N[idx_BS],
            self.document_N[idx_BS],
        )
        keep = num_rows * seq_len
        self.ids_N, self.modality_N, self.position_N, self.document_N = (
            t[keep:].clone()
            for t in (self.ids_N, self.modality_N, self.position_N, self.document_N)
        )
        return batch

    def state_dict(self) -> dict[str, list[int]]:
        """JSON-serializable contents."""
        tensors = (self.ids_N, self.modality_N, self.position_N, self.document_N)
        return {name: t.tolist() for name, t in zip(_FIELDS, tensors, strict=True)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PackBuffer:
        """Inverse of :meth:`state_dict`."""
        missing = [k for k in _FIELDS if k not in state]
        if missing:
            raise ValueError(f"pack buffer state is missing {missing}")
        lengths = {len(state[k]) for k in _FIELDS}
        if len(lengths) != 1:
            raise ValueError(f"pack buffer state has fields of different lengths {sorted(lengths)}")
        return cls(*(torch.tensor(state[k], dtype=torch.long) for k in _FIELDS))


def pack_rows(
    ids_BS: torch.Tensor,
    modality_BS: torch.Tensor,
    position_BS: torch.Tensor,
    document_BS: torch.Tensor,
) -> Batch:
    """Turn rows of ``seq_len + 1`` stream tokens into a :class:`Batch` (``plan=None``).

    Args:
        ids_BS: unified ids.
        modality_BS: modality index per id.
        position_BS: position of each id inside its document.
        document_BS: stream-unique document id per id.

    Returns:
        The batch: targets are the next ids, ``IGNORE_INDEX`` (target modality -1) across a
        document boundary; ``document_BT`` counts documents within each row from 0.
    """
    same_BT = document_BS[:, 1:] == document_BS[:, :-1]
    inputs_doc_BT = document_BS[:, :-1]
    change_BT = torch.zeros_like(inputs_doc_BT)
    change_BT[:, 1:] = (inputs_doc_BT[:, 1:] != inputs_doc_BT[:, :-1]).long()
    return Batch(
        tokens_BT=ids_BS[:, :-1].contiguous(),
        targets_BT=torch.where(same_BT, ids_BS[:, 1:], IGNORE_INDEX),
        modality_BT=modality_BS[:, :-1].contiguous(),
        target_modality_BT=torch.where(same_BT, modality_BS[:, 1:], -1),
        position_BT=position_BS[:, :-1].contiguous(),
        document_BT=change_BT.cumsum(dim=1),
    )
