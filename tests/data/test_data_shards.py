"""Data streams per rank: the split into processes does not change what a step sees."""

from __future__ import annotations

import json

import torch

from sparsefusion.data.documents import TEXT, Document, Segment
from sparsefusion.data.shards import ShardedLoaders, merge_shard_states


class _Tok:
    """Text -> byte ids (modality 0), with BOS = 1 and EOS = 2."""

    modalities = ["text"]

    def encode_documents(self, docs):
        out = []
        for d in docs:
            ids = [10 + b for b in d.segments[0].payload.encode()]
            out.append(([1, *ids, 2], [0] * (len(ids) + 2)))
        return out


class _Source:
    """Unbounded source; document ``i`` has length 3 + i % 11 and records its index."""

    def document(self, index: int) -> Document:
        return Document([Segment(TEXT, chr(97 + index % 26) * (3 + index % 11))], meta={})


def _loaders(rank: int, world: int, accum: int) -> ShardedLoaders:
    return ShardedLoaders(
        _Source(), _Tok(), seq_len=16, batch_size=2, rank=rank, world_size=world, grad_accum=accum
    )


def _step_tokens(groups: list[ShardedLoaders], accum: int) -> list[torch.Tensor]:
    """The micro-batches of one step over all ranks, in shard order."""
    return [g.next_batch(j).tokens_BT for g in groups for j in range(accum)]


def test_two_ranks_see_the_documents_of_one_process_with_grad_accum():
    one = [_loaders(0, 1, 2)]
    two = [_loaders(0, 2, 1), _loaders(1, 2, 1)]
    for _ in range(5):
        for a, b in zip(_step_tokens(one, 2), _step_tokens(two, 1), strict=True):
            assert torch.equal(a, b)


def test_state_moves_between_world_sizes_with_the_same_stream_count():
    two = [_loaders(0, 2, 1), _loaders(1, 2, 1)]
    for _ in range(3):
        _step_tokens(two, 1)
    state = json.loads(json.dumps(merge_shard_states([g.state_dict() for g in two])))
    one = _loaders(0, 1, 2)
    one.load_state_dict(state)
    for _ in range(3):
        for a, b in zip(_step_tokens([one], 2), _step_tokens(two, 1), strict=True):
            assert torch.equal(a, b)


def test_other_stream_count_restarts_after_the_furthest_document(caplog):
    two = [_loaders(0, 2, 1), _loaders(1, 2, 1)]
    for _ in range(3):
        _step_tokens(two, 1)
    state = merge_shard_states([g.state_dict() for g in two])
    furthest = max(ld.doc_index(ld.state_dict()["docs_read"] - 1) for g in two for ld in g.loaders)
    three = _loaders(0, 1, 3)
    three.load_state_dict(state)
    assert "streams restart after document" in caplog.text
    for loader in three.loaders:
        assert loader.doc_index(loader.state_dict()["docs_read"]) > furthest


def test_foundation_single_loader_state_still_loads():
    one = _loaders(0, 1, 1)
    one.next_batch(0)
    old_format = one.loaders[0].state_dict()  # what foundation checkpoints stored
    fresh = _loaders(0, 1, 1)
    fresh.load_state_dict(old_format)
    assert torch.equal(fresh.next_batch(0).tokens_BT, one.next_batch(0).tokens_BT)
