"""Packing for the Transfusion setting: text ids plus continuous image spans that never split.

Every document is encoded by the latent tokenizer (``tokenizers/latent.py``) into ids with
``[BOI] p_1 .. p_n [EOI]`` per image. Next-token targets are computed per document before packing
(the next id, ignored when the input or the target is a continuous patch or at the document's
end), so cutting the stream into rows loses no target. Rows of ``seq_len`` positions are filled
greedily; a document may continue in the next row (its positions keep counting), but an image's
``BOI .. EOI`` block never crosses a row: when it does not fit in what is left of a row, the rest
of the row is padding (ignored targets, its own document index, counted in ``padding_tokens``)
and the block starts the next row. The batch carries the clean latents of its images, each
image's first patch slot, ``span_BT`` (one id per image inside its row: its patches attend to
each other bidirectionally) and whether an image precedes its caption.

Image-caption pairs (documents of exactly one image and one text segment) are ordered caption
first with probability ``caption_first`` and lose the caption with probability
``caption_dropout`` (caption-first pairs only; classifier-free guidance's unconditional data);
both decisions are a deterministic function of (seed, document index), so a resumed loader
re-creates them.

Bad input: a document whose image encodes to non-finite latents is skipped and counted
(``data/skipped/nonfinite_latent``), like any other bad record.

Shape legend: B = rows, T = seq_len, I = images in the batch, Z/h/w = latent channels and side.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsefusion.data.batch import IGNORE_INDEX, Batch
from sparsefusion.data.documents import IMAGE, TEXT, Document
from sparsefusion.data.issues import BadInput, DataIssues

STATE_VERSION = 1


@dataclass
class _Doc:
    """An encoded document with per-position targets and its read cursor."""

    uid: int
    ids: list[int]
    mods: list[int]
    targets: list[int]
    latents: list[torch.Tensor]
    boi: list[int]
    early: list[bool]
    cursor: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def arrange_pair(
    doc: Document, rng: random.Random, caption_first: float, caption_dropout: float
) -> tuple[Document, list[bool]]:
    """Order (and maybe drop) the caption of an image-caption pair.

    Returns:
        The document to encode and, per image, whether it precedes its caption.
    """
    mods = [s.modality for s in doc.segments]
    if sorted(mods) != sorted([IMAGE, TEXT]):  # not a pair: kept as is, no noise limit
        return doc, [False] * mods.count(IMAGE)
    image = doc.segments[mods.index(IMAGE)]
    text = doc.segments[mods.index(TEXT)]
    first = rng.random() < caption_first
    drop = rng.random() < caption_dropout
    if first and drop:
        return Document(segments=[image], meta=dict(doc.meta, caption_dropped=True)), [False]
    if first:
        return Document(segments=[text, image], meta=doc.meta), [False]
    return Document(segments=[image, text], meta=doc.meta), [True]


def doc_targets(ids: list[int], mods: list[int]) -> list[int]:
    """Next id where both this and the next position are discrete (modality 0), else ignored."""
    out = [IGNORE_INDEX] * len(ids)
    for i in range(len(ids) - 1):
        if mods[i] == 0 and mods[i + 1] == 0:
            out[i] = ids[i + 1]
    return out


@dataclass
class _Row:
    """One row being filled."""

    T: int
    cols: dict[str, list[int]] = field(default_factory=dict)
    images: list[tuple[torch.Tensor, int, bool]] = field(default_factory=list)
    last_uid: int | None = None
    doc_index: int = -1

    def __post_init__(self) -> None:
        for k in ("ids", "mods", "targets", "tmods", "pos", "doc", "span"):
            self.cols[k] = []

    @property
    def used(self) -> int:
        return len(self.cols["ids"])

    @property
    def free(self) -> int:
        return self.T - self.used

    def add(self, doc: _Doc, lo: int, hi: int, image: int | None = None) -> None:
        if doc.uid != self.last_uid:
            self.doc_index += 1
            self.last_uid = doc.uid
        c = self.cols
        if image is not None:
            self.images.append((doc.latents[image], self.used + 1, doc.early[image]))
        span = len(self.images) - 1 if image is not None else -1
        for i in range(lo, hi):
            c["ids"].append(doc.ids[i])
            c["mods"].append(doc.mods[i])
            c["targets"].append(doc.targets[i])
            c["tmods"].append(0 if doc.targets[i] != IGNORE_INDEX else -1)
            c["pos"].append(i)
            c["doc"].append(self.doc_index)
            c["span"].append(span if doc.mods[i] != 0 else -1)

    def pad(self, pad_id: int) -> int:
        n = self.free
        self.doc_index += 1
        self.last_uid = None
        c = self.cols
        for k, v in (("ids", pad_id), ("mods", 0), ("targets", IGNORE_INDEX), ("tmods", -1)):
            c[k].extend([v] * n)
        c["pos"].extend(range(n))
        c["doc"].extend([self.doc_index] * n)
        c["span"].extend([-1] * n)
        return n


def rows_to_batch(rows: list[_Row]) -> Batch:
    """Stack filled rows into a :class:`Batch` with latents, slots and spans."""

    def stack(key: str) -> torch.Tensor:
        return torch.tensor([r.cols[key] for r in rows], dtype=torch.long)

    T = rows[0].T
    latents, slots, early = [], [], []
    for r, row in enumerate(rows):
        for lat, col, e in row.images:
            latents.append(lat)
            slots.append(r * T + col)
            early.append(e)
    has = bool(latents)
    return Batch(
        tokens_BT=stack("ids"),
        targets_BT=stack("targets"),
        modality_BT=stack("mods"),
        target_modality_BT=stack("tmods"),
        position_BT=stack("pos"),
        document_BT=stack("doc"),
        span_BT=stack("span"),
        latents_IZhw=torch.stack(latents).float() if has else None,
        image_slot_I=torch.tensor(slots, dtype=torch.long) if has else None,
        image_early_I=torch.tensor(early, dtype=torch.bool) if has else None,
    )


class LatentPackedLoader:
    """Deterministic, resumable iterator of packed Transfusion batches for one stream.

    Args:
        source: document source with ``document(index)`` (and optionally ``__len__``).
        tokenizer: a :class:`~sparsefusion.tokenizers.latent.LatentTokenizer`.
        seq_len: positions per row.
        batch_size: rows per batch.
        patch_size: latent patch side k (``model.patch_size``).
        seed: seed of the caption order / dropout decisions.
        caption_first: probability of caption -> image order for a pair.
        caption_dropout: probability that a caption-first pair loses its caption.
        rank: this stream.
        world_size: number of streams sharing the source.
        docs_per_chunk: documents encoded per tokenizer call.
        strict: raise on bad input instead of skipping it.
        max_doc_tokens: skip documents with more positions than this (0: no limit).
    """

    def __init__(
        self,
        source: Any,
        tokenizer: Any,
        *,
        seq_len: int,
        batch_size: int,
        patch_size: int,
        seed: int = 0,
        caption_first: float = 0.8,
        caption_dropout: float = 0.1,
        rank: int = 0,
        world_size: int = 1,
        docs_per_chunk: int = 64,
        strict: bool = False,
        max_doc_tokens: int = 0,
    ) -> None:
        n = tokenizer.patches_per_image(patch_size)
        if n + 2 > seq_len:
            raise ValueError(
                f"data.seq_len={seq_len} cannot hold one image ({n} patches + BOI + EOI with "
                f"model.patch_size={patch_size}); raise data.seq_len or model.patch_size"
            )
        if seq_len < 1 or batch_size < 1 or docs_per_chunk < 1:
            raise ValueError("seq_len, batch_size and docs_per_chunk must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.source, self.tokenizer = source, tokenizer
        self.seq_len, self.batch_size, self.patch_size = seq_len, batch_size, patch_size
        self.seed, self.caption_first, self.caption_dropout = seed, caption_first, caption_dropout
        self.rank, self.world_size, self.docs_per_chunk = rank, world_size, docs_per_chunk
        self.max_doc_tokens = max_doc_tokens
        self.issues = DataIssues(strict=strict)
        self._docs_read = 0
        self._pending: deque[_Doc] = deque()
        self._tokens_emitted = 0
        self._padding = 0
        self._images = 0

    def doc_index(self, k: int) -> int:
        return self.rank + k * self.world_size

    def _read(self, uid: int) -> tuple[Document, list[bool]] | None:
        size = len(self.source) if hasattr(self.source, "__len__") else None
        try:
            doc = self.source.document(uid % size if size else uid)
        except BadInput as e:
            self.issues.record(e)
            return None
        rng = random.Random(self.seed * 1_000_003 + uid)
        return arrange_pair(doc, rng, self.caption_first, self.caption_dropout)

    def _encode(self, uids: list[int], cursors: list[int] | None = None) -> list[_Doc]:
        read = [(u, self._read(u)) for u in uids]
        kept = [(u, r) for u, r in read if r is not None]
        if not kept:
            return []
        encoded = self.tokenizer.encode_latent_documents([r[0] for _, r in kept], self.patch_size)
        out = []
        for (uid, (doc, early)), enc in zip(kept, encoded, strict=True):
            bad = self._problem(doc, enc)
            if bad is not None:
                self.issues.record(bad)
                continue
            targets = doc_targets(enc.ids, enc.modalities)
            d = _Doc(uid, enc.ids, enc.modalities, targets, enc.latents, enc.boi, early)
            if cursors is not None:
                d.cursor = cursors[uids.index(uid)]
            out.append(d)
        return out

    def _problem(self, doc: Document, enc: Any) -> BadInput | None:
        where = doc.meta.get("where", f"{doc.meta.get('source')}[{doc.meta.get('index')}]")
        if any(not bool(torch.isfinite(z).all()) for z in enc.latents):
            return BadInput("nonfinite_latent", where, "the VAE encoded an image to NaN/inf")
        if self.max_doc_tokens and len(enc.ids) > self.max_doc_tokens:
            detail = f"{len(enc.ids)} positions > data.max_doc_tokens={self.max_doc_tokens}"
            return BadInput("oversize_document", where, detail)
        return None

    def _read_chunk(self) -> None:
        for _ in range(20):
            uids = [self.doc_index(self._docs_read + j) for j in range(self.docs_per_chunk)]
            self._docs_read += len(uids)
            docs = self._encode(uids)
            if docs:
                self._pending.extend(docs)
                return
        raise ValueError(f"no usable document in the last {20 * self.docs_per_chunk} read")

    def _fill(self, row: _Row, n: int) -> None:
        pad_id = self.tokenizer.vocab.pad_id
        while row.free > 0:
            if not self._pending:
                self._read_chunk()
            doc = self._pending[0]
            if doc.cursor >= len(doc):
                self._pending.popleft()
                continue
            if doc.cursor in doc.boi:
                if n + 2 > row.free:
                    self._padding += row.pad(pad_id)
                    return
                row.add(doc, doc.cursor, doc.cursor + n + 2, image=doc.boi.index(doc.cursor))
                doc.cursor += n + 2
                continue
            nxt = min([b for b in doc.boi if b > doc.cursor], default=len(doc))
            take = min(row.free, nxt - doc.cursor)
            row.add(doc, doc.cursor, doc.cursor + take)
            doc.cursor += take

    def next_batch(self) -> Batch:
        """The next packed batch (host tensors, (batch_size, seq_len))."""
        n = self.tokenizer.patches_per_image(self.patch_size)
        rows = []
        for _ in range(self.batch_size):
            row = _Row(self.seq_len)
            self._fill(row, n)
            rows.append(row)
        batch = rows_to_batch(rows)
        self._tokens_emitted += batch.num_tokens
        self._images += batch.num_images
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def issue_metrics(self) -> dict[str, int]:
        return self.issues.metrics()

    def loader_stats(self) -> dict[str, int]:
        stats = {
            "documents_read": self._docs_read,
            "tokens_emitted": self._tokens_emitted,
            "padding_tokens": self._padding,
            "images": self._images,
        }
        stats.update(self.issue_metrics())
        return stats

    def state_dict(self) -> dict[str, Any]:
        """JSON state: documents read, the unfinished documents (index, cursor), counters."""
        pending = [[d.uid, d.cursor] for d in self._pending if d.cursor < len(d)]
        return {
            "version": STATE_VERSION,
            "kind": "latent",
            "rank": self.rank,
            "world_size": self.world_size,
            "docs_read": self._docs_read,
            "buffer": {"pending": pending},  # unfinished documents, re-read on restore
            "tokens_emitted": self._tokens_emitted,
            "padding_tokens": self._padding,
            "images": self._images,
            "skipped": self.issues.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (unfinished documents are re-read and re-encoded)."""
        for key, mine in (("kind", "latent"), ("rank", self.rank), ("world_size", self.world_size)):
            if state.get(key) != mine:
                raise ValueError(f"loader state has {key}={state.get(key)!r}, this loader {mine!r}")
        self._docs_read = int(state["docs_read"])
        pending = state["buffer"]["pending"]
        uids = [int(u) for u, _ in pending]
        cursors = [int(c) for _, c in pending]
        self._pending = deque(self._encode(uids, cursors) if uids else [])
        self._tokens_emitted = int(state["tokens_emitted"])
        self._padding = int(state["padding_tokens"])
        self._images = int(state["images"])
        self.issues.load_state_dict(state.get("skipped", {}))


class LatentShardedLoaders:
    """The ``grad_accum`` latent streams of one rank (same layout as ``data/shards.py``).

    Args:
        source: the document source.
        tokenizer: the latent tokenizer.
        rank: this rank.
        world_size: number of ranks.
        grad_accum: micro-batches per optimizer step.
        **kwargs: passed to every :class:`LatentPackedLoader`.
    """

    def __init__(
        self,
        source: Any,
        tokenizer: Any,
        *,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
        **kwargs: Any,
    ) -> None:
        self.num_shards = world_size * grad_accum
        self.shard_ids = [rank * grad_accum + j for j in range(grad_accum)]
        self.loaders = [
            LatentPackedLoader(source, tokenizer, rank=s, world_size=self.num_shards, **kwargs)
            for s in self.shard_ids
        ]

    def next_batch(self, micro: int) -> Batch:
        return self.loaders[micro].next_batch()

    def close(self) -> None:
        """Nothing to stop (the streams are read in the training thread)."""

    def issue_metrics(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for loader in self.loaders:
            for key, value in loader.issue_metrics().items():
                total[key] = total.get(key, 0) + value
        return total

    def state_dict(self) -> dict[str, Any]:
        shards = {
            str(s): ld.state_dict() for s, ld in zip(self.shard_ids, self.loaders, strict=True)
        }
        return {"num_shards": self.num_shards, "shards": shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("num_shards", -1)) != self.num_shards:
            raise ValueError(
                f"the checkpoint has {state.get('num_shards')} latent data streams, this run "
                f"{self.num_shards} (world_size x train.grad_accum); resume with the same layout"
            )
        for s, loader in zip(self.shard_ids, self.loaders, strict=True):
            loader.load_state_dict(state["shards"][str(s)])


def latent_validation_batches(
    source: Any, tokenizer: Any, *, num_batches: int, noise_seed: int, **kwargs: Any
) -> list[Batch]:
    """A fixed list of packed batches, each with its own fixed ``noise_seed`` (seed + index)."""
    chunk = max(1, min(64, num_batches * kwargs.get("batch_size", 1)))
    loader = LatentPackedLoader(source, tokenizer, docs_per_chunk=chunk, **kwargs)
    out = []
    for i in range(num_batches):
        batch = loader.next_batch()
        batch.noise_seed = noise_seed + i
        out.append(batch)
    return out
