"""The Transfusion setting in the one packing path: image spans never split, latents/spans/slots
line up, the batches equal those of the former Transfusion loader, caption order, resume (also
from the former loader's state), background loading, bad input, and packed rows equal documents
run alone under the Transfusion objective."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch

from sparsefusion.data.batch import IGNORE_INDEX
from sparsefusion.data.documents import IMAGE, TEXT, Document, Segment
from sparsefusion.data.encoded import CaptionOrder, Encoded, Part
from sparsefusion.data.loader import PackedLoader, validation_batches
from sparsefusion.data.prefetch import BatchStream
from sparsefusion.data.shards import ShardedLoaders
from sparsefusion.models.transformer import ModelConfig
from sparsefusion.objectives.base import ObjectiveConfig, build_objective
from sparsefusion.objectives.forward import forward_loss
from sparsefusion.tokenizers.vocab import UnifiedVocab

PATCH_ID = 16 + 40  # vocab: 16 specials, 40 text ids, then the one image id
FIELDS = ("tokens_BT", "targets_BT", "modality_BT", "target_modality_BT", "position_BT",
          "document_BT", "span_BT", "latents_IZhw", "image_slot_I", "image_early_I")  # fmt: skip


class StubTokenizer:
    """Text: one id per word; an image (the payload is an int) encodes to a latent drawn from
    its payload (NaN for ``nan_for``)."""

    modalities = [TEXT, IMAGE]

    def __init__(self, side: int = 4, nan_for: int | None = None, patch_size: int = 2):
        self.vocab = UnifiedVocab({TEXT: 40, IMAGE: 1})
        self.side, self.nan_for, self.patch_size = side, nan_for, patch_size
        self.calls: list[int] = []

    def encode_documents(self, docs):
        n, out = (self.side // self.patch_size) ** 2, []
        self.calls.append(len(docs))
        for doc in docs:
            ids, mods, parts = [1], [0], []
            for seg in doc.segments:
                start = len(ids)
                if seg.modality == TEXT:
                    words = [16 + (len(w) % 40) for w in seg.payload.split()]
                    ids += words
                    mods += [0] * len(words)
                    parts.append(Part(TEXT, start, len(ids)))
                else:
                    g = torch.Generator().manual_seed(seg.payload)
                    value = torch.randn(2, self.side, self.side, generator=g)
                    if seg.payload == self.nan_for:
                        value[0, 0, 0] = float("nan")
                    ids += [3, *([PATCH_ID] * n), 4]
                    mods += [0, *([1] * n), 0]
                    parts.append(Part(IMAGE, start, len(ids), value))
            out.append(Encoded(ids + [2], mods + [0], parts))
        return out


class ListSource:
    name = "list"

    def __init__(self, docs):
        self.docs = docs

    def __len__(self):
        return len(self.docs)

    def document(self, i):
        return self.docs[i]


def _docs(count: int, seed: int = 0) -> list[Document]:
    """Caption-image pairs (some image first, some with a tail: not pairs) and text pages."""
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        words = " ".join("w" * rng.randint(1, 9) for _ in range(rng.randint(1, 7)))
        segs = [Segment(TEXT, words), Segment(IMAGE, i + 1)]
        if i % 3 == 0:
            segs.append(Segment(TEXT, "tail words here"))
        if i % 4 == 1:
            segs = segs[::-1]
        if i % 7 == 5:
            segs = [Segment(TEXT, "only text " * rng.randint(1, 6))]
        docs.append(Document(segments=segs, meta={"source": "list", "index": i}))
    return docs


def _loader(docs, tok=None, *, first=0.8, dropout=0.0, seed=0, **kw):
    args = dict(seq_len=13, batch_size=3, docs_per_chunk=4)
    order = CaptionOrder(seed, caption_first=first, caption_dropout=dropout)
    return PackedLoader(ListSource(docs), tok or StubTokenizer(), caption_order=order,
                        **{**args, **kw})  # fmt: skip


def _digest(batch) -> str:
    h = hashlib.sha256()
    for name in FIELDS:
        v = getattr(batch, name)
        h.update(name.encode())
        h.update(b"none" if v is None else v.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _same(a, b) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name


def test_batches_equal_the_former_transfusion_loader():
    # Digests of the batches data/latent_packing.py's LatentPackedLoader produced for these
    # documents (with an equivalent stub tokenizer), recorded before it was removed.
    former = [
        "690c0522e20c5f70", "517ec38bfeb28098", "64daf146c9211a11", "ebfd72466d068404",
        "e37bf8c5946bbf68", "69bfd5b53c4d1952", "1053c4ccc0b9bd00", "6770d7345a08034d",
        "0476f801a24f4537", "046e7f371062109c", "acf802db46bfcc89", "13713fc2db690f4b",
    ]  # fmt: skip
    loader = _loader(_docs(40), first=0.6, dropout=0.3, seed=5)
    assert [_digest(loader.next_batch()) for _ in range(12)] == former


def test_packing_never_splits_an_image_and_everything_lines_up():
    loader = _loader(_docs(30))
    n, T = 4, 13
    for _ in range(8):
        b = loader.next_batch()
        assert b.latents_IZhw is not None and b.image_slot_I is not None
        flat = b.tokens_BT.reshape(-1)
        span = b.span_BT.reshape(-1)
        for slot in b.image_slot_I.tolist():
            row = slot // T
            assert (slot + n - 1) // T == row and slot % T >= 1  # BOI in the same row too
            assert flat[slot - 1] == 3 and flat[slot + n] == 4  # BOI ... EOI
            assert (flat[slot : slot + n] == PATCH_ID).all()
            ids = span[slot : slot + n]
            assert (ids == ids[0]).all() and ids[0] >= 0
            assert (b.modality_BT.reshape(-1)[slot : slot + n] == 1).all()
        # No patch elsewhere; no target at a patch or BOI input; span ids unique per row.
        assert int((flat == PATCH_ID).sum()) == n * b.num_images
        targets = b.targets_BT.reshape(-1)
        assert bool((targets[(flat == PATCH_ID) | (flat == 3)] == IGNORE_INDEX).all())
        for r in range(b.tokens_BT.shape[0]):
            ids = b.span_BT[r][b.span_BT[r] >= 0].unique()
            assert ids.numel() == int((b.image_slot_I // T == r).sum())
    stats = loader.loader_stats()
    assert stats["padding_tokens"] > 0 and stats["images"] > 0


def test_text_targets_survive_row_boundaries():
    docs = [Document(segments=[Segment(TEXT, " ".join(["ab"] * 30))])]
    b = _loader(docs, seq_len=8, batch_size=2).next_batch()
    assert int(b.targets_BT[0, -1]) == int(b.tokens_BT[1, 0])  # predicted across the cut
    assert b.span_BT is None and b.latents_IZhw is None  # no image: nothing continuous


def test_caption_order_and_dropout_rates():
    (pair,) = StubTokenizer().encode_documents(
        [Document(segments=[Segment(IMAGE, 1), Segment(TEXT, "a caption")])]
    )
    order = CaptionOrder(0, caption_first=0.8, caption_dropout=0.1)
    firsts = drops = early = 0
    for uid in range(3000):
        doc = order(pair, uid)
        mods = [p.modality for p in doc.parts]
        firsts += mods[0] == TEXT or len(mods) == 1
        drops += len(mods) == 1
        early += [p.early for p in doc.spans] == [True]
        assert list(doc.ids[:1]) == [1] and list(doc.ids[-1:]) == [2] and len(doc.spans) == 1
    assert abs(firsts / 3000 - 0.8) < 0.03
    assert abs(drops / 3000 - 0.08) < 0.02
    assert early + firsts == 3000
    alone = Encoded([1, 20, 2], [0, 0, 0], [Part(TEXT, 1, 2)])
    assert order(alone, 7) is alone  # not a pair: as it is


@pytest.mark.parametrize("json_round_trip", [False, True])
def test_resumed_loader_yields_the_same_batches(json_round_trip):
    a = _loader(_docs(25), dropout=0.2)
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    assert state["buffer"]["values_of"]  # documents whose latents a restore encodes again
    if json_round_trip:
        state = json.loads(json.dumps(state))
    b = _loader(_docs(25), dropout=0.2)
    b.load_state_dict(state)
    for _ in range(4):
        _same(a.next_batch(), b.next_batch())
    assert a.loader_stats() == b.loader_stats()


def test_the_former_transfusion_loader_state_still_loads():
    a = _loader(_docs(25), dropout=0.2)
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    buf = state["buffer"]
    starts = [
        i for i in range(len(buf["ids"])) if i == 0 or buf["document"][i - 1] != buf["document"][i]
    ]
    former = {k: v for k, v in state.items() if k not in ("buffer", "modality_tokens")}
    former.update(kind="latent", buffer={"pending": [[buf["document"][i], buf["position"][i]]
                                                      for i in starts]})  # fmt: skip
    b = _loader(_docs(25), dropout=0.2)
    b.load_state_dict(former)
    for _ in range(4):
        _same(a.next_batch(), b.next_batch())


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_background_loading_equals_synchronous(kind):
    def stream(workers):
        loaders = ShardedLoaders(
            ListSource(_docs(60)), StubTokenizer(), seq_len=13, batch_size=3, grad_accum=2,
            docs_per_chunk=4, caption_order=CaptionOrder(3, 0.8, 0.1),
        )  # fmt: skip
        return BatchStream(loaders, workers=workers, kind=kind)

    sync, bg = stream(0), stream(1)
    for _ in range(5):
        for micro in range(2):
            _same(sync.next_batch(micro), bg.next_batch(micro))
    state = json.loads(json.dumps(bg.state_dict()))
    assert state == json.loads(json.dumps(sync.state_dict()))
    resumed = stream(1)
    resumed.load_state_dict(state)
    for _ in range(3):
        for micro in range(2):
            _same(sync.next_batch(micro), resumed.next_batch(micro))
    for s in (bg, resumed):
        s.close()


def test_validation_batches_carry_fixed_noise_seeds():
    kw = dict(seq_len=13, batch_size=2, num_batches=3, caption_order=CaptionOrder(0, 0.8, 0.1))
    val = validation_batches(ListSource(_docs(20)), StubTokenizer(), noise_seed=40, **kw)
    again = validation_batches(ListSource(_docs(20)), StubTokenizer(), noise_seed=40, **kw)
    assert [b.noise_seed for b in val] == [40, 41, 42]
    for a, b in zip(val, again, strict=True):
        _same(a, b)
    assert validation_batches(ListSource(_docs(20)), StubTokenizer(), **kw)[0].noise_seed is None


def test_nonfinite_latents_are_skipped_and_counted():
    loader = _loader(_docs(12), tok=StubTokenizer(nan_for=3))
    for _ in range(4):
        b = loader.next_batch()
        assert bool(torch.isfinite(b.latents_IZhw).all())
    assert loader.issue_metrics()["data/skipped/nonfinite_latent"] >= 1


def test_a_row_too_short_for_one_image_is_refused():
    with pytest.raises(ValueError, match="data.seq_len"):
        _loader(_docs(3), seq_len=5).next_batch()


def test_packed_equals_unpacked_for_the_transfusion_objective():
    pytest.importorskip("diffusers", reason="the transfusion extra is not installed")
    docs = _docs(2, seed=3)
    tok = StubTokenizer()
    lens = [len(e.ids) for e in tok.encode_documents(docs)]
    packed = _loader(docs, seq_len=sum(lens), batch_size=1, first=1.0).next_batch()
    alone = [
        _loader([d], seq_len=n, batch_size=1, first=1.0).next_batch()
        for d, n in zip(docs, lens, strict=True)
    ]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 2, 4, 4, generator=g)
    packed.timestep_I, packed.noise_IZhw = torch.tensor([100, 700]), noise
    for j, b in enumerate(alone):
        b.timestep_I, b.noise_IZhw = packed.timestep_I[j : j + 1], noise[j : j + 1]
    cfg = ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=2,
        num_heads=4,
        multiple_of=8,
        arch="mot",
        latent_channels=2,
        qk_norm=False,
        norm_placement="pre",
    )
    torch.manual_seed(0)
    model = cfg.build()
    model.init_weights()
    obj = build_objective(ObjectiveConfig(name="transfusion", z_loss=0.0), cfg)

    def sums_and_grads(batches):
        model.zero_grad()
        sums = {}
        for b in batches:
            out = forward_loss(model, b, obj).objective
            for k, term in out.terms.items():
                sums[k] = sums.get(k, 0.0) + term.total
        sum(sums.values()).backward()
        total = {k: float(v.detach()) for k, v in sums.items()}
        return total, [p.grad.clone() for p in model.parameters()]

    (s_packed, g_packed), (s_alone, g_alone) = sums_and_grads([packed]), sums_and_grads(alone)
    assert set(s_packed) == {"ce", "diffusion"}
    for k in s_packed:
        assert abs(s_packed[k] - s_alone[k]) < 1e-4 * max(1.0, abs(s_alone[k])), k
    for a, b in zip(g_packed, g_alone, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
