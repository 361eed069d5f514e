"""The stateful packed loader: source documents -> tokenizer -> packed batches, resumable exactly.

Rank ``r`` of ``w`` reads documents ``r, r + w, r + 2w, ...``, encodes them in chunks with one
``tokenizer.encode_documents`` call each (so images are tokenized in one batched call), and packs
the stream greedily (see ``packing.py``). The state (documents read, the carried-over buffer and
the counters) is plain JSON, and a loader restored from it yields exactly the batches an
uninterrupted loader would.

Tokenizer contract: ``encode_documents(docs) -> list[(ids, modality_per_id)]``, each document
beginning with BOS and ending with EOS. Documents of a token-shard source (``token_shards.py``)
are already encoded and skip the tokenizer.

Bad input: a document whose ``source.document(i)`` raises ``BadInput`` (see ``issues.py``), or
whose encoding exceeds ``max_doc_tokens``, is skipped and counted per reason (``loader_stats``
and ``issue_metrics``; the counts are part of the state); with ``strict=True`` it raises instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from sparsefusion.data.batch import Batch
from sparsefusion.data.issues import BadInput, DataIssues
from sparsefusion.data.packing import PackBuffer

STATE_VERSION = 1


class PackedLoader:
    """Deterministic, resumable iterator of packed CPU batches for one rank.

    Args:
        source: document source with ``document(index)`` (and optionally ``__len__``; a finite
            source is read in epochs, index modulo its length).
        tokenizer: object with ``encode_documents``.
        seq_len: inputs per row.
        batch_size: rows per batch.
        rank: this rank.
        world_size: number of ranks sharing the source.
        docs_per_chunk: documents encoded per ``encode_documents`` call.
        strict: raise on bad input instead of skipping it.
        max_doc_tokens: skip documents with more tokens than this (0: no limit).
    """

    def __init__(
        self,
        source: Any,
        tokenizer: Any,
        *,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        docs_per_chunk: int = 64,
        strict: bool = False,
        max_doc_tokens: int = 0,
    ) -> None:
        if seq_len < 1 or batch_size < 1 or docs_per_chunk < 1:
            raise ValueError(
                f"seq_len, batch_size and docs_per_chunk must be >= 1, got {seq_len}, "
                f"{batch_size}, {docs_per_chunk}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.source, self.tokenizer = source, tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size, self.docs_per_chunk = rank, world_size, docs_per_chunk
        self._docs_read = 0  # documents this rank has read (its k-th is rank + k * world_size)
        self._buffer = PackBuffer.empty()
        self._tokens_emitted = 0
        self._modality_tokens: dict[int, int] = {}
        self.issues = DataIssues(strict=strict)
        self.max_doc_tokens = max_doc_tokens
        self._barren_chunks = 0  # consecutive chunks without one usable document

    def doc_index(self, k: int) -> int:
        """Global stream index of this rank's ``k``-th document."""
        return self.rank + k * self.world_size

    def _read_chunk(self) -> None:
        uids = [self.doc_index(self._docs_read + j) for j in range(self.docs_per_chunk)]
        size = len(self.source) if hasattr(self.source, "__len__") else None
        docs, kept = [], []
        for u in uids:
            try:
                docs.append(self.source.document(u % size if size else u))
                kept.append(u)
            except BadInput as e:
                self.issues.record(e)
        encoded = _encode(self.tokenizer, docs)
        if len(encoded) != len(docs):
            raise ValueError(f"encode_documents returned {len(encoded)} results for {len(docs)}")
        if self.max_doc_tokens:
            fits = [len(e[0]) <= self.max_doc_tokens for e in encoded]
            for ok, doc, e in zip(fits, docs, encoded, strict=True):
                if not ok:
                    where = doc.meta.get(
                        "where", f"{doc.meta.get('source')}[{doc.meta.get('index')}]"
                    )
                    detail = f"{len(e[0])} tokens > data.max_doc_tokens={self.max_doc_tokens}"
                    self.issues.record(BadInput("oversize_document", where, detail))
            encoded = [e for e, ok in zip(encoded, fits, strict=True) if ok]
            kept = [u for u, ok in zip(kept, fits, strict=True) if ok]
        self._barren_chunks = 0 if encoded else self._barren_chunks + 1
        if self._barren_chunks >= 20:
            raise ValueError(
                f"no usable document in the last {20 * self.docs_per_chunk} read; "
                f"skipped so far: {self.issues.counts}"
            )
        self._buffer.extend(encoded, kept)
        self._docs_read += len(uids)

    def next_batch(self) -> Batch:
        """The next packed batch (CPU int64 tensors of shape (batch_size, seq_len), no plan)."""
        while len(self._buffer) < self.batch_size * self.seq_len + 1:
            self._read_chunk()
        batch = self._buffer.take_rows(self.batch_size, self.seq_len)
        self._tokens_emitted += batch.num_tokens
        counts = torch.bincount(batch.modality_BT.reshape(-1)).tolist()
        for m, n in enumerate(counts):
            if n:
                self._modality_tokens[m] = self._modality_tokens.get(m, 0) + n
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def loader_stats(self) -> dict[str, int]:
        """Counters: ``documents_read``, ``tokens_emitted`` and ``tokens_modality_<i>`` (inputs)."""
        stats = {"documents_read": self._docs_read, "tokens_emitted": self._tokens_emitted}
        for m in sorted(self._modality_tokens):
            stats[f"tokens_modality_{m}"] = self._modality_tokens[m]
        stats.update(self.issue_metrics())
        return stats

    def issue_metrics(self) -> dict[str, int]:
        """``data/skipped`` and ``data/skipped/<reason>`` counters."""
        return self.issues.metrics()

    def snapshot(self) -> dict[str, Any]:
        """The state as of now, cheaply (the buffer's tensors are shared, never mutated); turn
        it into :meth:`state_dict`'s form with :func:`state_from_snapshot`."""
        b = self._buffer
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "docs_read": self._docs_read,
            "buffer": PackBuffer(b.ids_N, b.modality_N, b.position_N, b.document_N),
            "tokens_emitted": self._tokens_emitted,
            "modality_tokens": {str(m): n for m, n in self._modality_tokens.items()},
            "skipped": self.issues.state_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state: documents read, the carried-over buffer and the counters."""
        return state_from_snapshot(self.snapshot())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (after a JSON round trip is fine).

        Raises:
            ValueError: on a different state version, rank or world size.
        """
        for key, mine in (
            ("version", STATE_VERSION),
            ("rank", self.rank),
            ("world_size", self.world_size),
        ):
            if state.get(key) != mine:
                raise ValueError(f"loader state has {key}={state.get(key)!r}, this loader {mine!r}")
        self._docs_read = int(state["docs_read"])
        self._buffer = PackBuffer.from_state_dict(state["buffer"])
        self._tokens_emitted = int(state["tokens_emitted"])
        self._modality_tokens = {int(m): int(n) for m, n in state["modality_tokens"].items()}
        self.issues.load_state_dict(state.get("skipped", {}))


def state_from_snapshot(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serializable loader state of a :meth:`PackedLoader.snapshot`."""
    return {**snapshot, "buffer": snapshot["buffer"].state_dict()}


def _encode(tokenizer: Any, docs: list[Any]) -> list[Any]:
    """Encode ``docs``; documents of a token-shard source arrive encoded (``.encoded``)."""
    if not docs:
        return []
    if all(hasattr(d, "encoded") for d in docs):
        return [d.encoded for d in docs]
    return tokenizer.encode_documents(docs)


def validation_batches(
    source: Any,
    tokenizer: Any,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    rank: int = 0,
    world_size: int = 1,
    strict: bool = False,
    max_doc_tokens: int = 0,
) -> list[Batch]:
    """A fixed, deterministic list of packed batches (pass the val-split source).

    Args:
        source: the validation source.
        tokenizer: object with ``encode_documents``.
        seq_len: inputs per row.
        batch_size: rows per batch.
        num_batches: number of batches.
        rank: this rank (ranks read disjoint documents).
        world_size: number of ranks.
        strict: raise on bad input instead of skipping it.
        max_doc_tokens: skip documents with more tokens than this (0: no limit).

    Returns:
        ``num_batches`` batches, identical on every call with the same arguments.
    """
    chunk = max(1, min(64, num_batches * batch_size))
    loader = PackedLoader(
        source,
        tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        docs_per_chunk=chunk,
        strict=strict,
        max_doc_tokens=max_doc_tokens,
    )
    return [loader.next_batch() for _ in range(num_batches)]
