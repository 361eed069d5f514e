"""Tests for the built-in scene corpus and the data config / source registry."""

from __future__ import annotations

from collections import Counter

import pytest

from sparsefusion.data.documents import IMAGE, TEXT
from sparsefusion.data.scene_draw import COLORS, SHAPES
from sparsefusion.data.scenes import DOC_KINDS, SceneCorpus
from sparsefusion.data.sources import DataConfig, build_source


def _images(doc):
    return [s.payload for s in doc.segments if s.modality == IMAGE]


def _texts(doc):
    return [s.payload for s in doc.segments if s.modality == TEXT]


def test_data_scenes_deterministic():
    a, b = SceneCorpus(seed=3), SceneCorpus(seed=3)
    for i in (0, 7, 123, 10_000):
        da, db = a.document(i), b.document(i)
        assert _texts(da) == _texts(db)
        assert [im.tobytes() for im in _images(da)] == [im.tobytes() for im in _images(db)]
        assert da.meta == db.meta
    # Random access order does not matter.
    assert _texts(a.document(5)) == _texts(SceneCorpus(seed=3).document(5))


def test_data_scenes_splits_and_seeds_differ():
    train, val = SceneCorpus(split="train"), SceneCorpus(split="val")
    other = SceneCorpus(seed=1, split="train")
    same_val = sum(_texts(train.document(i)) == _texts(val.document(i)) for i in range(50))
    same_seed = sum(_texts(train.document(i)) == _texts(other.document(i)) for i in range(50))
    assert same_val < 3 and same_seed < 3
    assert train.fingerprint() == val.fingerprint() == other.fingerprint()
    assert SceneCorpus(image_size=64).fingerprint() != train.fingerprint()


def test_data_scenes_captions_match_drawn_shapes():
    corpus = SceneCorpus(seed=0, image_size=32)
    kinds: Counter[str] = Counter()
    for i in range(200):
        doc = corpus.document(i)
        kinds[doc.meta["kind"]] += 1
        images = _images(doc)
        assert len(images) == len(doc.meta["captions"]) == len(doc.meta["scenes"])
        for img, cap, scene in zip(images, doc.meta["captions"], doc.meta["scenes"], strict=True):
            assert img.mode == "RGB" and img.size == (32, 32)
            assert scene["background"] in cap
            assert 1 <= len(scene["shapes"]) <= 3
            cells = {(s["row"], s["col"]) for s in scene["shapes"]}
            assert len(cells) == len(scene["shapes"])  # no two shapes share a cell
            pixels = {rgb for _, rgb in img.getcolors(maxcolors=1024)}
            for s in scene["shapes"]:
                assert s["color"] in cap and s["shape"] in cap and s["size"] in cap
                assert COLORS[s["color"]] in pixels  # the shape was really drawn
        for text in _texts(doc):
            assert text.isascii() and len(text.split()) >= 3
    assert set(kinds) == set(DOC_KINDS)


def test_data_scenes_document_layouts():
    corpus = SceneCorpus(seed=2)
    for i in range(100):
        doc = corpus.document(i)
        mods, kind = doc.modalities(), doc.meta["kind"]
        if kind == "caption_image":
            assert mods == [TEXT, IMAGE]
        elif kind == "image_caption":
            assert mods == [IMAGE, TEXT]
        elif kind == "text_only":
            assert mods == [TEXT]
            assert doc.segments[0].payload[0].isupper() and doc.segments[0].payload.endswith(".")
        else:
            assert 2 <= mods.count(IMAGE) <= 3
            assert mods[:2] == [TEXT, IMAGE] and all(
                a != b for a, b in zip(mods[:-1], mods[1:], strict=True)
            )


def test_data_scenes_doc_mix_weights():
    only_text = SceneCorpus(doc_mix={"text_only": 1.0, "interleaved": 0.0})
    assert {only_text.document(i).meta["kind"] for i in range(30)} == {"text_only"}
    with pytest.raises(ValueError, match="unknown document kinds"):
        SceneCorpus(doc_mix={"video": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        SceneCorpus(doc_mix={"text_only": -1.0, "interleaved": 2.0})
    with pytest.raises(ValueError, match="positive sum"):
        SceneCorpus(doc_mix={"text_only": 0.0})
    with pytest.raises(ValueError, match="split"):
        SceneCorpus(split="test")  # type: ignore[arg-type]


def test_data_scenes_shape_vocabulary_covered():
    corpus = SceneCorpus(seed=4)
    seen = set()
    for i in range(200):
        for scene in corpus.document(i).meta["scenes"]:
            seen.update(s["shape"] for s in scene["shapes"])
    assert seen == set(SHAPES)


def test_data_config_and_build_source():
    cfg = DataConfig(image_size=16, doc_mix={"caption_image": 1.0})
    src = build_source(cfg, seed=5, split="val")
    assert isinstance(src, SceneCorpus) and src.name == "scenes"
    assert src.split == "val" and src.seed == 5 and src.image_size == 16
    assert _images(src.document(0))[0].size == (16, 16)
    with pytest.raises(ValueError, match="valid: .*'scenes'"):
        DataConfig(source="laion")
    with pytest.raises(ValueError, match="data.doc_mix"):
        DataConfig(doc_mix={"caption_image": 1.0, "bogus": 1.0})
    with pytest.raises(ValueError, match="data.seq_len"):
        DataConfig(seq_len=0)
    cfg.source = "nope"
    with pytest.raises(ValueError, match="valid: .*'scenes'"):
        build_source(cfg, seed=0, split="train")
