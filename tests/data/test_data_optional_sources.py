"""Installable real sources (each skipped when its package is absent) and the mixture."""

from __future__ import annotations

import pytest

from sparsefusion.data.mixture import MixtureSource, vocab_modalities
from sparsefusion.data.optional import SourceUnavailable
from sparsefusion.data.scenes import SceneCorpus
from sparsefusion.data.sources import DataConfig, build_source


def _build(name: str, split: str = "train", **kw):
    try:
        return build_source(DataConfig(source=name, image_size=16, **kw), seed=0, split=split)
    except SourceUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("name", ["openmoji", "fashion_mnist"])
def test_image_sources_give_captioned_images(name):
    train, val = _build(name), _build(name, "val")
    assert len(train) > 10 * len(val) > 0
    kinds = set()
    for i in range(40):
        doc = train.document(i)
        kinds.add(doc.meta["kind"])
        images = [s.payload for s in doc.segments if s.modality == "image"]
        texts = [s.payload for s in doc.segments if s.modality == "text"]
        assert images and len(images) == len(texts) == len(doc.meta["captions"])
        assert images[0].size == (16, 16) and images[0].mode == "RGB"
        assert images[0].getextrema() != ((255, 255), (255, 255), (255, 255))  # not blank
    assert kinds == {"caption_image", "image_caption", "interleaved"}
    a, b = train.document(3), train.document(3)
    assert a.meta == b.meta and a.segments[0].modality == b.segments[0].modality


@pytest.mark.parametrize("name,word", [("kjv", "God"), ("austen", "Elizabeth")])
def test_text_sources_give_passages(name, word):
    src = _build(name)
    assert len(src) > 1000 and vocab_modalities(src) == ["text", "image"]
    text = " ".join(src.document(i).segments[0].payload for i in range(len(src)))
    assert word in text and src.document(5).meta["kind"] == "text_only"


def test_speech_source_synthesises_clips():
    src = _build("speech")
    kinds = set()
    for i in range(12):
        doc = src.document(i)
        kinds.add(doc.meta["kind"])
        clips = [s.payload for s in doc.segments if s.modality == "speech"]
        assert clips and all(c.ndim == 1 and c.numel() > 8000 for c in clips)
        assert float(clips[0].abs().max()) > 0.05
    assert len(kinds) >= 3 and src.modalities == ["text", "speech"]


def test_missing_package_is_reported_clearly(monkeypatch):
    from sparsefusion.data import image_sources

    monkeypatch.setattr(image_sources, "FASHION_DIR", "/nonexistent/fashion")
    with pytest.raises(SourceUnavailable, match="apt-get install dataset-fashion-mnist"):
        build_source(DataConfig(source="fashion_mnist"), seed=0, split="train")


class _Finite:
    name = "finite"
    modalities = ["text", "speech"]

    def __len__(self):
        return 3

    def fingerprint(self):
        return "finite"

    def document(self, index):
        doc = SceneCorpus(seed=9).document(index)
        doc.meta["source"] = "finite"
        return doc


def test_mixture_is_deterministic_and_weighted():
    parts = {"scenes": SceneCorpus(seed=1), "finite": _Finite()}
    mix = MixtureSource(parts, {"scenes": 3.0, "finite": 1.0}, seed=0)
    assert mix.modalities == ["text", "image", "speech"]
    names = [mix.document(i).meta["source"] == "finite" for i in range(400)]
    assert 0.15 < sum(names) / len(names) < 0.35  # about a quarter from the finite source
    assert [mix.document(i).meta for i in range(20)] == [mix.document(i).meta for i in range(20)]
    other = MixtureSource(parts, {"scenes": 1.0, "finite": 1.0}, seed=0)
    assert other.fingerprint() != mix.fingerprint()


def test_mixture_config_validation():
    with pytest.raises(ValueError, match="data.mixture"):
        DataConfig(source="mixture", mixture={"laion": 1.0})
    with pytest.raises(ValueError, match="data.mixture"):
        DataConfig(source="mixture", mixture={"scenes": 0.0})
    with pytest.raises(ValueError, match="data.mixture"):
        DataConfig(source="mixture")
