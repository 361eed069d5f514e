"""The data streams of one rank: the corpus split into ``world_size x grad_accum`` shards.

Shard ``s`` of ``S`` is a :class:`PackedLoader` reading documents ``s, s + S, s + 2S, ...``; rank
``r`` owns shards ``r * grad_accum + j`` for micro-batch ``j``. So one optimizer step consumes one
micro-batch from every shard, whatever the split into processes: 2 ranks x ``grad_accum=1`` see
exactly the documents of 1 process x ``grad_accum=2``, and a checkpoint resumed with the same
``world_size x grad_accum`` continues every stream exactly, on any number of processes.

A checkpoint written with a different number of shards cannot be mapped exactly (each stream
packs its own documents). Then every new stream restarts just after the furthest document any
old stream had read, and the old streams' carried-over tokens are dropped (a warning says so):
no document is seen twice, a few are skipped.
"""

from __future__ import annotations

import logging
from typing import Any

from sparsefusion.data.batch import Batch
from sparsefusion.data.loader import STATE_VERSION, PackedLoader
from sparsefusion.data.packing import PackBuffer, buffered_positions

log = logging.getLogger("sparsefusion")


class ShardedLoaders:
    """The ``grad_accum`` shard loaders of one rank.

    Args:
        source: the document source.
        tokenizer: object with ``encode_documents`` (discrete or Transfusion, see ``loader.py``).
        seq_len: inputs per row.
        batch_size: rows per micro-batch (per rank).
        rank: this rank.
        world_size: number of ranks.
        grad_accum: micro-batches per optimizer step.
        **loader_kwargs: passed to every :class:`PackedLoader` (``strict``, ``max_doc_tokens``,
            ``caption_order``, ``docs_per_chunk``).
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
        grad_accum: int = 1,
        **loader_kwargs: Any,
    ) -> None:
        self.num_shards = world_size * grad_accum
        self.shard_ids = [rank * grad_accum + j for j in range(grad_accum)]
        self.loaders = [
            PackedLoader(
                source,
                tokenizer,
                seq_len=seq_len,
                batch_size=batch_size,
                rank=s,
                world_size=self.num_shards,
                **loader_kwargs,
            )
            for s in self.shard_ids
        ]

    def issue_metrics(self) -> dict[str, int]:
        """Skipped-input counters summed over this rank's shard loaders."""
        total: dict[str, int] = {}
        for loader in self.loaders:
            for key, value in loader.issue_metrics().items():
                total[key] = total.get(key, 0) + value
        return total

    def next_batch(self, micro: int) -> Batch:
        """The next batch of micro-batch slot ``micro`` (0 <= micro < grad_accum)."""
        return self.loaders[micro].next_batch()

    def state_dict(self) -> dict[str, Any]:
        """``{"num_shards": S, "shards": {"<s>": PackedLoader state}}`` for this rank's shards."""
        return {
            "num_shards": self.num_shards,
            "shards": {
                str(s): ld.state_dict() for s, ld in zip(self.shard_ids, self.loaders, strict=True)
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from the merged states of all shards (see :func:`merge_shard_states`).

        Accepts the single-loader state of older checkpoints (one shard).
        """
        if "version" in state:  # a plain PackedLoader state (foundation checkpoints)
            state = {"num_shards": 1, "shards": {"0": state}}
        shards = state["shards"]
        if int(state["num_shards"]) == self.num_shards and all(
            str(s) in shards for s in self.shard_ids
        ):
            for s, loader in zip(self.shard_ids, self.loaders, strict=True):
                loader.load_state_dict(shards[str(s)])
            return
        old = int(state["num_shards"])
        furthest = max(st["rank"] + (st["docs_read"] - 1) * old for st in shards.values()) + 1
        dropped = sum(buffered_positions(st["buffer"]) for st in shards.values())
        log.warning(
            "data: checkpoint has %d streams, this run %d (world_size x grad_accum); streams "
            "restart after document %d and %d buffered tokens are dropped",
            old,
            self.num_shards,
            furthest,
            dropped,
        )
        for s, loader in zip(self.shard_ids, self.loaders, strict=True):
            loader.load_state_dict(_restart_state(s, self.num_shards, furthest))


def _restart_state(shard: int, num_shards: int, first_doc: int) -> dict[str, Any]:
    """A fresh loader state for ``shard`` whose next document index is >= ``first_doc``."""
    docs_read = max(0, -(-(first_doc - shard) // num_shards))
    return {
        "version": STATE_VERSION,
        "rank": shard,
        "world_size": num_shards,
        "docs_read": docs_read,
        "buffer": PackBuffer.empty().state_dict(),
        "tokens_emitted": 0,
        "modality_tokens": {},
    }


def merge_shard_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge per-rank :meth:`ShardedLoaders.state_dict` results into one mapping."""
    sizes = {int(s["num_shards"]) for s in states}
    if len(sizes) != 1:
        raise ValueError(f"data shard states disagree on num_shards: {sorted(sizes)}")
    merged: dict[str, Any] = {}
    for s in states:
        merged.update(s["shards"])
    return {"num_shards": sizes.pop(), "shards": merged}
