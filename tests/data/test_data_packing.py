"""Tests for greedy packing and the resumable packed loader (with a fake tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch

from sparsefusion.data.batch import IGNORE_INDEX, Batch
from sparsefusion.data.documents import TEXT, Document, Segment
from sparsefusion.data.loader import PackedLoader, validation_batches
from sparsefusion.data.packing import PackBuffer
from sparsefusion.data.scenes import SceneCorpus

BOS, EOS, BOI, EOI = 1, 2, 3, 4
FIELDS = (
    "tokens_BT",
    "targets_BT",
    "modality_BT",
    "target_modality_BT",
    "position_BT",
    "document_BT",
)


class FakeVocab:
    pad_id, bos_id, eos_id = 0, BOS, EOS


class FakeTokenizer:
    """Text -> bytes + 16 (modality 0); image -> BOI, 4 codes from the pixels (modality 1), EOI."""

    vocab = FakeVocab()

    def __init__(self) -> None:
        self.seen: list[int] = []

    def encode_documents(self, docs: list[Document]) -> list[tuple[list[int], list[int]]]:
        out = []
        for doc in docs:
            self.seen.append(doc.meta["index"])
            ids, mods = [BOS], [0]
            for seg in doc.segments:
                if seg.modality == TEXT:
                    text_ids = [b + 16 for b in seg.payload.encode()]
                    ids += text_ids
                    mods += [0] * len(text_ids)
                else:
                    data = seg.payload.tobytes()
                    codes = [300 + data[k * len(data) // 4] % 16 for k in range(4)]
                    ids += [BOI, *codes, EOI]
                    mods += [0, 1, 1, 1, 1, 0]
            out.append((ids + [EOS], mods + [0]))
        return out


class TinySource:
    """A finite source of short text documents of varying length."""

    name = "tiny"

    def __len__(self) -> int:
        return 7

    def document(self, index: int) -> Document:
        return Document([Segment(TEXT, "ab" * (index % 7 + 1))], meta={"index": index})


def _stream(source, tok, num_docs: int, rank: int = 0, world: int = 1):
    docs = [source.document(rank + k * world) for k in range(num_docs)]
    enc = FakeTokenizer().encode_documents(docs)
    return [i for ids, _ in enc for i in ids], [m for _, ms in enc for m in ms], enc


def _cat_rows(batches: list[Batch], name: str) -> torch.Tensor:
    return torch.cat([getattr(b, name).reshape(-1) for b in batches])


def test_data_pack_rows_exact():
    buf = PackBuffer.empty()
    buf.extend(
        [([1, 5, 6, 2], [0, 0, 1, 0]), ([1, 7, 2], [0, 1, 0]), ([1, 8, 9, 2], [0] * 4)],
        [10, 11, 12],
    )
    b = buf.take(buf.cut(2, 4), 4)
    assert b.tokens_BT.tolist() == [[1, 5, 6, 2], [1, 7, 2, 1]]
    assert b.targets_BT.tolist() == [[5, 6, 2, IGNORE_INDEX], [7, 2, IGNORE_INDEX, 8]]
    assert b.modality_BT.tolist() == [[0, 0, 1, 0], [0, 1, 0, 0]]
    assert b.target_modality_BT.tolist() == [[0, 1, 0, -1], [1, 0, -1, 0]]
    assert b.position_BT.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]
    assert b.document_BT.tolist() == [[0, 0, 0, 0], [0, 0, 0, 1]]
    assert b.span_BT is None and b.tokens_BT.dtype == torch.long
    # The last target (8) is the next row's first input; its target (9) travels with it.
    assert buf.ids_N.tolist() == [8, 9, 2] and buf.position_N.tolist() == [1, 2, 3]
    assert buf.target_N.tolist() == [9, 2, IGNORE_INDEX]
    assert buf.cut(1, 4) is None  # not enough buffered yet


def test_data_pack_rows_split_document_continues():
    buf = PackBuffer.empty()
    buf.extend([([1, 5, 6, 7, 8, 9, 2], [0] * 7), ([1, 4, 2], [0] * 3)], [3, 4])
    b = buf.take(buf.cut(2, 4), 4)
    assert b.position_BT.tolist() == [[0, 1, 2, 3], [4, 5, 6, 0]]
    assert b.document_BT.tolist() == [[0, 0, 0, 0], [0, 0, 0, 1]]
    assert b.targets_BT.tolist() == [[5, 6, 7, 8], [9, 2, IGNORE_INDEX, 4]]


@pytest.mark.parametrize("seq_len", [8, 33])
def test_data_packing_invariants(seq_len: int):
    source, tok = SceneCorpus(seed=1), FakeTokenizer()
    loader = PackedLoader(source, tok, seq_len=seq_len, batch_size=3, docs_per_chunk=5)
    batches = [loader.next_batch() for _ in range(6)]
    stream, stream_mods, enc = _stream(source, tok, len(tok.seen))
    n = 6 * 3 * seq_len
    # Inputs, in row order, are exactly the stream; every non-ignored target reconstructs it too.
    assert _cat_rows(batches, "tokens_BT").tolist() == stream[:n]
    assert _cat_rows(batches, "modality_BT").tolist() == stream_mods[:n]
    starts = set(torch.tensor([len(ids) for ids, _ in enc]).cumsum(0).tolist())
    expect_targets = [t for i, t in enumerate(stream[1 : n + 1], start=1) if i not in starts]
    targets = _cat_rows(batches, "targets_BT")
    assert targets[targets != IGNORE_INDEX].tolist() == expect_targets
    ref_pos = [p for ids, _ in enc for p in range(len(ids))]
    assert _cat_rows(batches, "position_BT").tolist() == ref_pos[:n]
    for b in batches:
        assert b.tokens_BT.shape == (3, seq_len)
        ignored = b.targets_BT == IGNORE_INDEX
        assert torch.equal(ignored, b.tokens_BT == EOS)  # only across a document boundary
        assert torch.equal(b.target_modality_BT == -1, ignored)
        assert torch.equal(b.modality_BT == 1, (b.tokens_BT >= 300))
        inner = ~ignored[:, :-1]
        assert torch.equal(b.targets_BT[:, :-1][inner], b.tokens_BT[:, 1:][inner])
        assert torch.equal(b.target_modality_BT[:, :-1][inner], b.modality_BT[:, 1:][inner])
        assert torch.all(b.position_BT[b.tokens_BT == BOS] == 0)
        step = b.document_BT[:, 1:] - b.document_BT[:, :-1]
        assert torch.equal(step == 1, b.tokens_BT[:, 1:] == BOS) and torch.all(step >= 0)
        assert torch.all(b.document_BT[:, 0] == 0)
        same = step == 0
        dpos = b.position_BT[:, 1:] - b.position_BT[:, :-1]
        assert torch.all(dpos[same] == 1)


def _assert_same(a: Batch, b: Batch) -> None:
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_data_loader_resume_exact():
    source = SceneCorpus(seed=0)
    straight = PackedLoader(source, FakeTokenizer(), seq_len=40, batch_size=2, docs_per_chunk=4)
    first = [straight.next_batch() for _ in range(3)]
    state = json.loads(json.dumps(straight.state_dict()))
    expected = [straight.next_batch() for _ in range(5)]
    resumed = PackedLoader(source, FakeTokenizer(), seq_len=40, batch_size=2, docs_per_chunk=4)
    resumed.load_state_dict(state)
    for a, b in zip(expected, [resumed.next_batch() for _ in range(5)], strict=True):
        _assert_same(a, b)
    assert resumed.loader_stats() == straight.loader_stats()
    fresh = PackedLoader(source, FakeTokenizer(), seq_len=40, batch_size=2, docs_per_chunk=4)
    for a, b in zip(first + expected, [fresh.next_batch() for _ in range(8)], strict=True):
        _assert_same(a, b)
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(
            source, FakeTokenizer(), seq_len=40, batch_size=2, rank=1, world_size=2
        ).load_state_dict(state)


def test_data_loader_ranks_disjoint():
    source = SceneCorpus(seed=0)
    toks = [FakeTokenizer(), FakeTokenizer()]
    loaders = [
        PackedLoader(
            source, toks[r], seq_len=16, batch_size=2, rank=r, world_size=2, docs_per_chunk=3
        )
        for r in range(2)
    ]
    for ld in loaders:
        for _ in range(4):
            ld.next_batch()
    assert toks[0].seen == list(range(0, 2 * len(toks[0].seen), 2))
    assert toks[1].seen == list(range(1, 2 * len(toks[1].seen), 2))
    assert not set(toks[0].seen) & set(toks[1].seen)
    stream1, _, _ = _stream(source, None, len(toks[1].seen), rank=1, world=2)
    rank1 = PackedLoader(source, FakeTokenizer(), seq_len=16, batch_size=2, rank=1, world_size=2)
    assert rank1.next_batch().tokens_BT.reshape(-1).tolist() == stream1[:32]


def test_data_loader_stats_and_finite_source():
    loader = PackedLoader(TinySource(), FakeTokenizer(), seq_len=10, batch_size=2, docs_per_chunk=3)
    it = iter(loader)
    batches = [next(it) for _ in range(4)]
    stats = loader.loader_stats()
    assert stats["tokens_emitted"] == 4 * 2 * 10 == stats["tokens_modality_0"]
    num_docs = stats["documents_read"]
    assert num_docs == len(loader.tokenizer.seen) > 7
    assert loader.tokenizer.seen == [i % 7 for i in range(num_docs)]
    # Finite source: epoch wrap-around, documents 7.. repeat documents 0..
    stream, _, _ = _stream(TinySource(), None, stats["documents_read"])
    assert _cat_rows(batches, "tokens_BT").tolist() == stream[:80]
    scene_loader = PackedLoader(SceneCorpus(), FakeTokenizer(), seq_len=32, batch_size=2)
    b = scene_loader.next_batch()
    s = scene_loader.loader_stats()
    assert s.get("tokens_modality_1", 0) == int((b.modality_BT == 1).sum())
    assert s["tokens_modality_0"] + s.get("tokens_modality_1", 0) == 64


def test_data_validation_batches_fixed():
    val = SceneCorpus(seed=0, split="val")
    a = validation_batches(val, FakeTokenizer(), seq_len=24, batch_size=2, num_batches=3)
    b = validation_batches(val, FakeTokenizer(), seq_len=24, batch_size=2, num_batches=3)
    assert len(a) == 3
    for x, y in zip(a, b, strict=True):
        _assert_same(x, y)
    train = validation_batches(
        SceneCorpus(seed=0), FakeTokenizer(), seq_len=24, batch_size=2, num_batches=1
    )
    assert not torch.equal(train[0].tokens_BT, a[0].tokens_BT)
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(val, FakeTokenizer(), seq_len=8, batch_size=1, rank=2, world_size=2)
