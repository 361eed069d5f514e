"""MultimodalTokenizer: document encoding layout, decode round trip, malformed spans, save/load."""

import json
import random

import pytest
import torch
from PIL import Image, ImageDraw

from sparsefusion.data.documents import IMAGE, TEXT, Document, Segment
from sparsefusion.tokenizers.image_vq import ImageVQConfig, train_vq
from sparsefusion.tokenizers.multimodal import MultimodalTokenizer, TokenizerCacheError
from sparsefusion.tokenizers.text_bpe import BPETextTokenizer
from sparsefusion.tokenizers.vocab import UnifiedVocab

WORDS = ["red", "blue", "green", "square", "circle", "left", "of", "above", "a", "the"]


def square(seed: int) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", (16, 16), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    x, y = rng.randint(0, 8), rng.randint(0, 8)
    ImageDraw.Draw(img).rectangle([x, y, x + 7, y + 7], fill=(250, 250, 250))
    return img


def sentence(seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(6)) + "."


@pytest.fixture(scope="module")
def tok() -> MultimodalTokenizer:
    torch.manual_seed(0)
    text = BPETextTokenizer.train([sentence(i) for i in range(200)], vocab_size=280)
    cfg = ImageVQConfig(
        image_size=16,
        downsample=4,
        codebook_size=16,
        code_dim=8,
        hidden=16,
        num_res_blocks=1,
        train_steps=20,
        batch_size=16,
        held_out=8,
    )
    image, _ = train_vq(cfg, [square(i) for i in range(64)])
    return MultimodalTokenizer(text, image, UnifiedVocab({"text": text.vocab_size, "image": 16}))


def test_tok_mm_encode_layout(tok):
    v = tok.vocab
    doc = Document(
        [Segment(TEXT, "a red square."), Segment(IMAGE, square(1)), Segment(TEXT, " ok")]
    )
    ids, mods = tok.encode_document(doc)
    assert len(ids) == len(mods)
    t1 = [i + v.offset("text") for i in tok.text.encode("a red square.")]
    t2 = [i + v.offset("text") for i in tok.text.encode(" ok")]
    codes = (tok.image.encode([square(1)])[0] + v.offset("image")).tolist()
    assert ids == [v.bos_id, *t1, v.boi_id, *codes, v.eoi_id, *t2, v.eos_id]
    assert mods == [0] * (1 + len(t1) + 1) + [1] * 16 + [0] * (1 + len(t2) + 1)
    assert torch.equal(v.modality_of(torch.tensor(ids)), torch.tensor(mods))
    assert tok.modalities == ["text", "image"]


def test_tok_mm_batched_equals_single(tok):
    docs = [Document([Segment(IMAGE, square(i)), Segment(TEXT, sentence(i))]) for i in range(3)] + [
        Document([Segment(TEXT, "only text")]),
        Document([]),
    ]
    assert tok.encode_documents(docs) == [tok.encode_document(d) for d in docs]
    assert tok.encode_documents([Document([])]) == [([1, 2], [0, 0])]


def test_tok_mm_unknown_modality(tok):
    with pytest.raises(ValueError, match="speech"):
        tok.encode_document(Document([Segment("speech", [0.0, 1.0])]))


def test_tok_mm_decode_round_trip(tok):
    img = square(7)
    doc = Document(
        [
            Segment(TEXT, "the blue circle \u00e9 "),
            Segment(IMAGE, img),
            Segment(TEXT, "left of a square."),
        ]
    )
    ids, _ = tok.encode_document(doc)
    segs = tok.decode(ids)
    assert [s.modality for s in segs] == [TEXT, IMAGE, TEXT]
    assert segs[0].payload == "the blue circle \u00e9 " and segs[2].payload == "left of a square."
    # the decoded image is the VQ reconstruction of exactly the encoded codes
    codes = tok.image.encode([img])
    assert segs[1].payload.tobytes() == tok.image.decode(codes)[0].tobytes()


def test_tok_mm_decode_malformed(tok):
    v = tok.vocab
    off = v.offset("image")
    text = [i + v.offset("text") for i in tok.text.encode("red")]
    short = [v.bos_id, *text, v.boi_id, off + 3, off + 5, v.eoi_id, v.eos_id]
    segs = tok.decode(short)
    assert [s.modality for s in segs] == [TEXT, IMAGE]
    padded = torch.tensor([[3, 5] + [5] * 14])
    assert segs[1].payload.tobytes() == tok.image.decode(padded)[0].tobytes()
    long_no_eoi = [v.boi_id, *[off + 1] * 20, *text]  # too many codes, text ends the span
    segs = tok.decode(long_no_eoi)
    assert [s.modality for s in segs] == [IMAGE, TEXT] and segs[1].payload == "red"
    assert [s.modality for s in tok.decode([v.boi_id, off + 2])] == [IMAGE]  # truncated at end
    assert tok.decode([v.boi_id, v.eoi_id, off + 1, v.eoi_id, v.pad_id]) == []
    assert tok.decode([]) == []


def test_tok_mm_save_load_and_corruption(tok, tmp_path):
    d = tmp_path / "tok"
    tok.save(d)
    again = MultimodalTokenizer.load(d)
    doc = Document([Segment(TEXT, sentence(3)), Segment(IMAGE, square(3))])
    assert again.encode_document(doc) == tok.encode_document(doc)
    assert again.vocab == tok.vocab
    # a flipped byte in the weights is caught by the manifest hash
    blob = bytearray((d / "image_vq.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (d / "image_vq.safetensors").write_bytes(bytes(blob))
    with pytest.raises(TokenizerCacheError, match="image_vq.safetensors"):
        MultimodalTokenizer.load(d)
    tok.save(d)
    (d / "manifest.json").write_text("{broken")
    with pytest.raises(TokenizerCacheError, match="manifest"):
        MultimodalTokenizer.load(d)
    tok.save(d)
    (d / "vocab.json").unlink()
    with pytest.raises(TokenizerCacheError, match="vocab.json"):
        MultimodalTokenizer.load(d)
    # a manifest from another format version is rejected
    tok.save(d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TokenizerCacheError, match="format_version"):
        MultimodalTokenizer.load(d)


def test_tok_mm_vocab_mismatch(tok):
    with pytest.raises(ValueError, match="image"):
        MultimodalTokenizer(
            tok.text, tok.image, UnifiedVocab({"text": tok.text.vocab_size, "image": 17})
        )
