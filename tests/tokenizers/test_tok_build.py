"""load_or_train_tokenizer: training from a source, cache reuse, corruption -> warn + retrain."""

import random

import pytest
import torch
from PIL import Image

from sparsefusion.data.documents import IMAGE, TEXT, Document, Segment
from sparsefusion.tokenizers.build import (
    TokenizerConfig,
    cache_key,
    collect_training_data,
    load_or_train_tokenizer,
)
from sparsefusion.tokenizers.image_vq import ImageVQConfig

COLOURS = ["red", "green", "blue", "yellow"]
RGB = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 60, 220),
    "yellow": (240, 220, 30),
}


class FakeSource:
    """Documents with a caption and a 16x16 coloured square (``num_docs`` of them)."""

    def __init__(self, num_docs: int = 60, seed: int = 0, images: bool = True) -> None:
        self.name = "fake"
        self.num_docs, self.seed, self.images = num_docs, seed, images

    def fingerprint(self) -> str:
        return f"fake-{self.num_docs}-{self.seed}-{self.images}"

    def document(self, index: int) -> Document:
        if not 0 <= index < self.num_docs:
            raise IndexError(index)
        rng = random.Random(self.seed * 100_003 + index)
        fg, bg = rng.sample(COLOURS, 2)
        segs = [Segment(TEXT, f"a {fg} square on a {bg} background.")]
        if self.images:
            img = Image.new("RGB", (16, 16), RGB[bg])
            x, y = rng.randint(0, 8), rng.randint(0, 8)
            img.paste(RGB[fg], (x, y, x + 8, y + 8))
            segs.append(Segment(IMAGE, img))
        return Document(segs)


def tiny_cfg(tmp_path, **kw) -> TokenizerConfig:
    image = ImageVQConfig(
        image_size=16,
        downsample=4,
        codebook_size=16,
        code_dim=8,
        hidden=16,
        num_res_blocks=1,
        train_steps=10,
        batch_size=8,
        held_out=4,
    )
    base = dict(
        text_vocab_size=280,
        text_train_docs=40,
        image=image,
        image_train_images=30,
        cache_dir=str(tmp_path / "cache"),
    )
    return TokenizerConfig(**(base | kw))


def test_tok_build_train_then_reuse(tmp_path):
    cfg, src, logs = tiny_cfg(tmp_path), FakeSource(), []
    torch.manual_seed(0)
    tok = load_or_train_tokenizer(cfg, src, progress=False, log=logs.append)
    assert any("recon_mse" in m and "codebook_usage" in m for m in logs)
    assert tok.vocab.modality_sizes == {"text": tok.text.vocab_size, "image": 16}
    dirs = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert [p.name for p in dirs] == [f"fake-{cache_key(cfg, src)}"]  # no temp dirs left behind
    logs.clear()
    again = load_or_train_tokenizer(cfg, src, progress=False, log=logs.append)
    assert any("loaded" in m for m in logs) and not any("training" in m for m in logs)
    doc = src.document(3)
    assert again.encode_document(doc) == tok.encode_document(doc)


def test_tok_build_corrupt_cache_retrains(tmp_path):
    cfg, src = tiny_cfg(tmp_path), FakeSource()
    load_or_train_tokenizer(cfg, src, progress=False, log=lambda m: None)
    final = tmp_path / "cache" / f"fake-{cache_key(cfg, src)}"
    (final / "text.json").write_text('{"corrupted": true}')
    logs = []
    with pytest.warns(UserWarning, match="corrupt"):
        tok = load_or_train_tokenizer(cfg, src, progress=False, log=logs.append)
    assert any("training BPE" in m for m in logs)
    assert tok.text.decode(tok.text.encode("a red square")) == "a red square"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == [final.name]
    logs.clear()
    load_or_train_tokenizer(cfg, src, progress=False, log=logs.append)  # repaired copy loads
    assert any("loaded" in m for m in logs)


def test_tok_build_cache_key():
    src = FakeSource()
    a = TokenizerConfig(cache_dir="x")
    assert cache_key(a, src) == cache_key(TokenizerConfig(cache_dir="y"), src)
    assert cache_key(a, src) != cache_key(TokenizerConfig(cache_dir="x", text_vocab_size=999), src)
    assert cache_key(a, src) != cache_key(a, FakeSource(seed=1))
    with pytest.raises(ValueError, match="text_vocab_size"):
        TokenizerConfig(text_vocab_size=10)


def test_tok_build_collect_training_data(tmp_path):
    cfg = tiny_cfg(tmp_path, text_train_docs=5, image_train_images=12)
    texts, images, _ = collect_training_data(cfg, FakeSource())
    assert len(texts) == 5 and len(images) == 12
    texts, images, _ = collect_training_data(cfg, FakeSource(num_docs=8))  # source runs out
    assert len(texts) == 5 and len(images) == 8
    texts, images, _ = collect_training_data(cfg, FakeSource(images=False))  # stops after texts
    assert len(texts) == 5 and images == []


def test_tok_build_text_only_source(tmp_path):
    cfg = tiny_cfg(tmp_path)
    with pytest.warns(UserWarning, match="no images"):
        tok = load_or_train_tokenizer(
            cfg, FakeSource(images=False), progress=False, log=lambda m: None
        )
    assert tok.vocab.modalities == ["text", "image"]


def test_tok_build_concurrent_starts_train_once(tmp_path, monkeypatch):
    """Two runs started together (a sweep): one trains, the other waits and loads its copy."""
    import threading
    import time

    import sparsefusion.tokenizers.build as build

    cfg, trained, real = tiny_cfg(tmp_path), [], build.train_tokenizer
    started = threading.Event()

    def slow_train(*args, **kwargs):
        trained.append(threading.current_thread().name)
        started.set()
        tok = real(*args, **kwargs)
        time.sleep(1.0)  # long enough for "b" to find the lock held
        return tok

    monkeypatch.setattr(build, "train_tokenizer", slow_train)
    results, logs = {}, {"a": [], "b": []}

    def start(name):
        results[name] = load_or_train_tokenizer(cfg, FakeSource(), progress=False,
                                                log=logs[name].append)  # fmt: skip

    first = threading.Thread(target=start, args=("a",), name="a")
    first.start()
    assert started.wait(60)  # "a" holds the lock and is training
    second = threading.Thread(target=start, args=("b",), name="b")
    second.start()
    first.join(120)
    second.join(120)
    assert trained == ["a"]
    assert any("waiting" in m for m in logs["b"]) and any("loaded" in m for m in logs["b"])
    doc = FakeSource().document(5)
    assert results["a"].encode_document(doc) == results["b"].encode_document(doc)
