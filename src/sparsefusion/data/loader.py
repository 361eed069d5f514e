"""The stateful packed loader: source documents -> tokenizer -> packed batches, resumable exactly.

Rank ``r`` of ``w`` reads documents ``r, r + w, r + 2w, ...``, encodes them in chunks with one
``tokenizer.encode_documents`` call each (so images are tokenized in one batched call), and packs
the stream greedily (see ``packing.py``). The state (documents read, the carried-over buffer and
the counters) is plain JSON, and a loader restored from it yields exactly the batches an
uninterrupted loader would.

Tokenizer contract: ``encode_documents(docs)`` gives per document ``(ids, modality_per_id)`` or
an :class:`~sparsefusion.data.encoded.Encoded` (the Transfusion tokenizer's, with continuous
spans), each document beginning with BOS and ending with EOS. Documents of a token-shard source
(``token_shards.py``) are already encoded and skip the tokenizer. A ``caption_order``
(``encoded.py``) re-orders image-caption pairs per document index. The values of continuous
spans (image latents) are not part of the JSON state: a restored loader encodes the documents
they came from again.

Bad input: a document whose ``source.document(i)`` raises ``BadInput`` (see ``issues.py``), whose
continuous spans hold NaN/inf, or whose encoding exceeds ``max_doc_tokens`` positions, is
skipped and counted per reason (``loader_stats`` and ``issue_metrics``; the counts are part of
the state); with ``strict=True`` it raises instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from sparsefusion.data.batch import Batch
from sparsefusion.data.encoded import CaptionOrder, Encoded, as_encoded
from sparsefusion.data.issues import BadInput, DataIssues
from sparsefusion.data.packing import PackBuffer, snapshot_state
from sparsefusion.data.text import read_document

STATE_VERSION = 1


class PackedLoader:
    """Deterministic, resumable iterator of packed CPU batches for one rank.

    Args:
        source: document source with ``document(index)`` (and optionally ``__len__``; a finite
            source is read in epochs, index modulo its length).
        tokenizer: object with ``encode_documents`` (and ``vocab.pad_id`` when its documents
            have continuous spans).
        seq_len: inputs per row.
        batch_size: rows per batch.
        rank: this rank.
        world_size: number of ranks sharing the source.
        docs_per_chunk: documents encoded per ``encode_documents`` call.
        strict: raise on bad input instead of skipping it.
        max_doc_tokens: skip documents with more positions than this (0: no limit).
        caption_order: re-orders image-caption pairs (None: documents as the source has them).
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
        caption_order: CaptionOrder | None = None,
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
        self.caption_order = caption_order
        self._docs_read = 0  # documents this rank has read (its k-th is rank + k * world_size)
        self._buffer = PackBuffer.empty()
        self._tokens_emitted = 0
        self._modality_tokens: dict[int, int] = {}
        self._padding = 0  # padded positions (rows cut short by a continuous span)
        self._spans = 0  # continuous spans emitted
        self.issues = DataIssues(strict=strict)
        self.max_doc_tokens = max_doc_tokens
        self._barren_chunks = 0  # consecutive chunks without one usable document
        self._modalities = getattr(tokenizer, "modalities", None)

    def doc_index(self, k: int) -> int:
        """Global stream index of this rank's ``k``-th document."""
        return self.rank + k * self.world_size

    def _read(self, uids: list[int]) -> tuple[list[Any], list[int]]:
        """The documents of stream indices ``uids`` that can be read, and their indices."""
        size = len(self.source) if hasattr(self.source, "__len__") else None
        docs, kept = [], []
        for u in uids:
            try:
                index = u % size if size else u
                docs.append(read_document(self.source, index, self._modalities))
                kept.append(u)
            except BadInput as e:
                self.issues.record(e)
        return docs, kept

    def _encode(self, docs: list[Any], uids: list[int]) -> list[Encoded]:
        encoded = [as_encoded(e) for e in _encode(self.tokenizer, docs)]
        if len(encoded) != len(docs):
            raise ValueError(f"encode_documents returned {len(encoded)} results for {len(docs)}")
        if self.caption_order is not None:
            encoded = [self.caption_order(e, u) for e, u in zip(encoded, uids, strict=True)]
        return encoded

    def _problem(self, doc: Any, encoded: Encoded) -> BadInput | None:
        where = doc.meta.get("where", f"{doc.meta.get('source')}[{doc.meta.get('index')}]")
        if any(not bool(torch.isfinite(span.value).all()) for span in encoded.spans):
            return BadInput("nonfinite_latent", where, "the VAE encoded an image to NaN/inf")
        if self.max_doc_tokens and len(encoded) > self.max_doc_tokens:
            detail = f"{len(encoded)} positions > data.max_doc_tokens={self.max_doc_tokens}"
            return BadInput("oversize_document", where, detail)
        return None

    def _read_chunk(self) -> None:
        uids = [self.doc_index(self._docs_read + j) for j in range(self.docs_per_chunk)]
        docs, kept = self._read(uids)
        usable, usable_uids = [], []
        for doc, enc, uid in zip(docs, self._encode(docs, kept), kept, strict=True):
            problem = self._problem(doc, enc)
            if problem is None:
                usable.append(enc)
                usable_uids.append(uid)
            else:
                self.issues.record(problem)
        self._barren_chunks = 0 if usable else self._barren_chunks + 1
        if self._barren_chunks >= 20:
            raise ValueError(
                f"no usable document in the last {20 * self.docs_per_chunk} read; "
                f"skipped so far: {self.issues.counts}"
            )
        self._buffer.extend(usable, usable_uids)
        self._docs_read += len(uids)

    def next_batch(self) -> Batch:
        """The next packed batch (CPU tensors of shape (batch_size, seq_len), no plan)."""
        while (rows := self._buffer.cut(self.batch_size, self.seq_len)) is None:
            self._read_chunk()
        padding = sum(self.seq_len - (stop - start) for start, stop in rows)
        pad_id = self.tokenizer.vocab.pad_id if padding else 0
        batch = self._buffer.take(rows, self.seq_len, pad_id)
        self._tokens_emitted += batch.num_tokens
        self._padding += padding
        self._spans += batch.num_images
        counts = torch.bincount(batch.modality_BT.reshape(-1)).tolist()
        for m, n in enumerate(counts):
            if n:
                self._modality_tokens[m] = self._modality_tokens.get(m, 0) + n
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def loader_stats(self) -> dict[str, int]:
        """Counters: ``documents_read``, ``tokens_emitted``, ``tokens_modality_<i>`` (inputs),
        ``padding_tokens`` and ``images`` (continuous spans)."""
        stats = {"documents_read": self._docs_read, "tokens_emitted": self._tokens_emitted}
        for m in sorted(self._modality_tokens):
            stats[f"tokens_modality_{m}"] = self._modality_tokens[m]
        stats.update(padding_tokens=self._padding, images=self._spans)
        stats.update(self.issue_metrics())
        return stats

    def issue_metrics(self) -> dict[str, int]:
        """``data/skipped`` and ``data/skipped/<reason>`` counters."""
        return self.issues.metrics()

    def snapshot(self) -> dict[str, Any]:
        """The state as of now, cheaply (the buffer's tensors are shared, never mutated); turn
        it into :meth:`state_dict`'s form with :func:`state_from_snapshot`."""
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "docs_read": self._docs_read,
            "buffer": self._buffer.snapshot(),
            "tokens_emitted": self._tokens_emitted,
            "modality_tokens": {str(m): n for m, n in self._modality_tokens.items()},
            "padding_tokens": self._padding,
            "images": self._spans,
            "skipped": self.issues.state_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state: documents read, the carried-over buffer and the counters."""
        return state_from_snapshot(self.snapshot())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (after a JSON round trip is fine); also the
        state of the former Transfusion loader (``kind: latent``, unfinished documents).

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
        buffer = state["buffer"]
        if "pending" in buffer:  # the former Transfusion loader: (document, cursor) pairs
            self._buffer = PackBuffer.empty()
            self._extend_again([int(u) for u, _ in buffer["pending"]],
                               [int(c) for _, c in buffer["pending"]], self._buffer)  # fmt: skip
        else:
            self._buffer = PackBuffer.from_state_dict(buffer)
            if buffer.get("values_of"):
                self._buffer = self._with_values(self._buffer, set(buffer["values_of"]))
        self._tokens_emitted = int(state["tokens_emitted"])
        self._modality_tokens = {
            int(m): int(n) for m, n in state.get("modality_tokens", {}).items()
        }
        self._padding = int(state.get("padding_tokens", 0))
        self._spans = int(state.get("images", 0))
        self.issues.load_state_dict(state.get("skipped", {}))

    def _encode_again(self, uids: list[int]) -> list[Encoded]:
        """Documents ``uids`` of the saved data position, encoded again (one tokenizer call)."""
        docs, kept = self._read(uids)
        if kept != uids:
            missing = sorted(set(uids) - set(kept))
            raise ValueError(
                f"documents {missing} of the saved data position cannot be read any more "
                "(has the source changed?)"
            )
        return self._encode(docs, uids)

    def _extend_again(self, uids: list[int], starts: list[int], buffer: PackBuffer) -> None:
        buffer.extend(self._encode_again(uids), uids, starts)

    def _with_values(self, tokens: PackBuffer, again: set[int]) -> PackBuffer:
        """``tokens`` with the documents in ``again`` encoded again (for their span values)."""
        doc_N = tokens.document_N
        bounds = [0, *((doc_N[1:] != doc_N[:-1]).nonzero().squeeze(1) + 1).tolist(), len(doc_N)]
        runs = [(int(doc_N[a]), a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        uids = [uid for uid, _, _ in runs if uid in again]
        encoded = dict(zip(uids, self._encode_again(uids), strict=True))
        buffer = PackBuffer.empty()
        for uid, a, b in runs:
            if uid in encoded:
                buffer.extend([encoded[uid]], [uid], [int(tokens.position_N[a])])
            else:
                buffer.append_positions(tokens.ids_N[a:b], tokens.modality_N[a:b],
                                        tokens.position_N[a:b], tokens.document_N[a:b])  # fmt: skip
        if not torch.equal(buffer.ids_N, tokens.ids_N):
            raise ValueError("the documents of the saved data position encode differently now "
                             "(has the source or the tokenizer changed?)")  # fmt: skip
        return buffer


def state_from_snapshot(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serializable loader state of a :meth:`PackedLoader.snapshot`."""
    return {**snapshot, "buffer": snapshot_state(snapshot["buffer"])}


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
    caption_order: CaptionOrder | None = None,
    noise_seed: int | None = None,
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
        max_doc_tokens: skip documents with more positions than this (0: no limit).
        caption_order: re-orders image-caption pairs (None: documents as they are).
        noise_seed: batch ``i`` carries ``noise_seed + i`` (``Batch.noise_seed``), so an
            objective that samples (diffusion noise and timesteps) sees the same inputs on
            every pass; None: no seed.

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
        caption_order=caption_order,
    )
    batches = [loader.next_batch() for _ in range(num_batches)]
    if noise_seed is not None:
        for i, batch in enumerate(batches):
            batch.noise_seed = noise_seed + i
    return batches
