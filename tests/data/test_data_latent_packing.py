"""Transfusion packing: image spans never split, latents/spans/slots line up, resume, bad input,
and packed rows equal documents run alone under the diffusion objective."""

from __future__ import annotations

import random

import pytest
import torch

from sparsefusion.data.batch import IGNORE_INDEX
from sparsefusion.data.documents import IMAGE, TEXT, Document, Segment
from sparsefusion.data.latent_packing import LatentPackedLoader, arrange_pair
from sparsefusion.models.transformer import ModelConfig
from sparsefusion.objectives.base import ObjectiveConfig, build_objective
from sparsefusion.objectives.forward import forward_loss
from sparsefusion.tokenizers.latent import LatentDocument
from sparsefusion.tokenizers.vocab import UnifiedVocab

PATCH_ID = 16 + 40  # vocab: 16 specials, 40 text ids, then the one image id


class StubTokenizer:
    """Text: one id per word; an image (the payload is an int) encodes to a constant latent."""

    def __init__(self, side: int = 4, nan_for: int | None = None):
        self.vocab = UnifiedVocab({TEXT: 40, IMAGE: 1})
        self.side, self.nan_for = side, nan_for

    def patches_per_image(self, k: int) -> int:
        return (self.side // k) ** 2

    def encode_latent_documents(self, docs, k):
        n, out = self.patches_per_image(k), []
        for doc in docs:
            enc = LatentDocument([1], [0], [], [])
            for seg in doc.segments:
                if seg.modality == TEXT:
                    words = [16 + (len(w) % 40) for w in seg.payload.split()]
                    enc.ids += words
                    enc.modalities += [0] * len(words)
                else:
                    value = float("nan") if seg.payload == self.nan_for else float(seg.payload)
                    enc.boi.append(len(enc.ids))
                    enc.latents.append(torch.full((2, self.side, self.side), value))
                    enc.ids += [3, *([PATCH_ID] * n), 4]
                    enc.modalities += [0, *([1] * n), 0]
            enc.ids.append(2)
            enc.modalities.append(0)
            out.append(enc)
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
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        words = " ".join("w" * rng.randint(1, 9) for _ in range(rng.randint(1, 7)))
        segs = [Segment(TEXT, words), Segment(IMAGE, i + 1)]
        if i % 3 == 0:
            segs.append(Segment(TEXT, "tail words here"))
        docs.append(Document(segments=segs, meta={"source": "list", "index": i}))
    return docs


def _loader(docs, tok=None, **kw):
    args = dict(seq_len=13, batch_size=3, patch_size=2, caption_dropout=0.0, docs_per_chunk=4)
    return LatentPackedLoader(ListSource(docs), tok or StubTokenizer(), **{**args, **kw})


def test_packing_never_splits_an_image_and_everything_lines_up():
    loader = _loader(_docs(30))
    n, T = 4, 13
    for _ in range(8):
        b = loader.next_batch()
        assert b.latents_IZhw is not None and b.image_slot_I is not None
        flat = b.tokens_BT.reshape(-1)
        span = b.span_BT.reshape(-1)
        for j, slot in enumerate(b.image_slot_I.tolist()):
            row = slot // T
            assert (slot + n - 1) // T == row and slot % T >= 1  # BOI in the same row too
            assert flat[slot - 1] == 3 and flat[slot + n] == 4  # BOI ... EOI
            assert (flat[slot : slot + n] == PATCH_ID).all()
            ids = span[slot : slot + n]
            assert (ids == ids[0]).all() and ids[0] >= 0
            assert (b.modality_BT.reshape(-1)[slot : slot + n] == 1).all()
            value = b.latents_IZhw[j, 0, 0, 0]  # the image's payload: its latent, in order
            assert (b.latents_IZhw[j] == value).all()
        # No patch elsewhere; no target at a patch or BOI input; span ids unique per row.
        assert int((flat == PATCH_ID).sum()) == n * b.num_images
        targets = b.targets_BT.reshape(-1)
        assert bool((targets[(flat == PATCH_ID) | (flat == 3)] == IGNORE_INDEX).all())
        for r in range(b.tokens_BT.shape[0]):
            ids = b.span_BT[r][b.span_BT[r] >= 0].unique()
            assert ids.numel() == int((b.image_slot_I // T == r).sum())
    assert loader.loader_stats()["padding_tokens"] > 0


def test_text_targets_survive_row_boundaries():
    docs = [Document(segments=[Segment(TEXT, " ".join(["ab"] * 30))])]
    b = _loader(docs, seq_len=8, batch_size=2).next_batch()
    assert int(b.targets_BT[0, -1]) == int(b.tokens_BT[1, 0])  # predicted across the cut


def test_caption_order_and_dropout_rates():
    pair = Document(segments=[Segment(IMAGE, 1), Segment(TEXT, "a caption")])
    firsts = drops = early = 0
    for uid in range(3000):
        doc, flags = arrange_pair(pair, random.Random(uid), 0.8, 0.1)
        firsts += doc.segments[0].modality == TEXT or len(doc.segments) == 1
        drops += len(doc.segments) == 1
        early += flags == [True]
    assert abs(firsts / 3000 - 0.8) < 0.03
    assert abs(drops / 3000 - 0.08) < 0.02
    assert early + firsts == 3000


def test_resumed_loader_yields_the_same_batches():
    a = _loader(_docs(25))
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    b = _loader(_docs(25))
    b.load_state_dict(state)
    for _ in range(3):
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x.tokens_BT, y.tokens_BT) and torch.equal(x.span_BT, y.span_BT)
        assert torch.equal(x.latents_IZhw, y.latents_IZhw)


def test_nonfinite_latents_are_skipped_and_counted():
    loader = _loader(_docs(12), tok=StubTokenizer(nan_for=3))
    for _ in range(4):
        b = loader.next_batch()
        assert bool(torch.isfinite(b.latents_IZhw).all())
    assert loader.issue_metrics()["data/skipped/nonfinite_latent"] >= 1


def test_a_row_too_short_for_one_image_is_refused():
    with pytest.raises(ValueError, match="data.seq_len"):
        _loader(_docs(3), seq_len=5)


def test_packed_equals_unpacked_for_the_diffusion_objective():
    pytest.importorskip("diffusers", reason="the transfusion extra is not installed")
    docs = _docs(2, seed=3)
    tok = StubTokenizer()
    lens = [len(e.ids) for e in tok.encode_latent_documents(docs, 2)]
    packed = _loader(docs, seq_len=sum(lens), batch_size=1, caption_first=1.0).next_batch()
    alone = [
        _loader([d], seq_len=n, batch_size=1, caption_first=1.0).next_batch()
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
        total, sums = 0.0, {}
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
