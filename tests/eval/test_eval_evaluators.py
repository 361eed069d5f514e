"""Evaluator networks and the fid_sf / clip_sf scores on real held-out scene images."""

import json
import sys

import pytest
import torch
from PIL import ImageFilter

from sparsefusion.data.scenes import SceneCorpus
from sparsefusion.eval.evaluators import (
    EvaluatorConfig,
    EvaluatorError,
    load_evaluators,
    load_or_train,
)
from sparsefusion.eval.pairs import images_to_tensor, read_pairs
from sparsefusion.eval.scores import clip_sf, fid_sf

TINY = {"train_pairs": 500, "heldout_pairs": 96, "epochs": 3, "batch_size": 32}


@pytest.fixture(scope="module")
def trained(tiny_evaluator):
    cfg = EvaluatorConfig(**tiny_evaluator)
    ev = load_or_train(
        cfg, SceneCorpus(split="train"), SceneCorpus(split="val"), image_size=32, log=lambda s: None
    )
    val = read_pairs(SceneCorpus(split="val"), 192)
    return cfg, ev, val


def _set(pairs, fn=None):
    return images_to_tensor([fn(p.image) if fn else p.image for p in pairs], 32)


def test_frechet_self_zero_blur_noise_monotone_random_far(trained):
    _, ev, val = trained
    real, other = _set(val[:96]), _set(val[96:])
    assert fid_sf(ev.features, real, real) == pytest.approx(0.0, abs=1e-3)
    base = fid_sf(ev.features, real, other)
    blur = [
        fid_sf(
            ev.features,
            real,
            _set(val[96:], lambda im, r=r: im.filter(ImageFilter.GaussianBlur(r))),
        )
        for r in (1.0, 2.0, 3.0)
    ]
    assert blur == sorted(blur) and blur[-1] > 2 * base
    gen = torch.Generator().manual_seed(0)
    noise_1 = torch.randn(other.shape, generator=gen)
    noise = [
        fid_sf(ev.features, real, (other + s * noise_1).clamp(0, 1)) for s in (0.05, 0.1, 0.2, 0.4)
    ]
    assert noise == sorted(noise)
    random = fid_sf(ev.features, real, torch.rand(other.shape, generator=gen))
    assert random > 20 * max(base, 1e-6)


def test_clip_sf_matching_above_shuffled(trained):
    _, ev, val = trained
    images, caps = _set(val[:96]), [p.caption for p in val[:96]]
    shuffled = caps[7:] + caps[:7]
    assert clip_sf(ev, images, caps) > clip_sf(ev, images, shuffled) + 5.0


def test_manifest_accuracies_and_cache_reuse(trained):
    cfg, ev, val = trained
    m = ev.manifest
    assert m["source_fingerprint"] == SceneCorpus().fingerprint()
    held = m["heldout"]
    assert held["retrieval_i2t_top1"] > 2 * held["retrieval_chance"]
    assert 0.0 <= held["label_accuracy"] <= 1.0 and "label_macro_f1" in held
    again = load_or_train(
        cfg, SceneCorpus(split="train"), SceneCorpus(split="val"), image_size=32, log=lambda s: None
    )
    assert again.path == ev.path  # loaded from the cache, not retrained
    real = _set(val[:32])
    assert torch.equal(again.features(real), ev.features(real))


def test_evaluator_of_another_corpus_is_refused(trained, tmp_path):
    cfg, ev, _ = trained
    other = SceneCorpus(split="train", image_size=16)  # another fingerprint
    with pytest.raises(EvaluatorError, match="trained on corpus"):
        load_or_train(
            EvaluatorConfig(path=str(ev.path), **TINY),
            other,
            SceneCorpus(split="val"),
            image_size=16,
            log=lambda s: None,
        )
    # a cache folder whose manifest names another corpus is refused too, never reused
    manifest = json.loads((ev.path / "manifest.json").read_text())
    manifest["source_fingerprint"] = "something-else"
    fake = tmp_path / "copy"
    fake.mkdir()
    for f in ev.path.iterdir():
        (fake / f.name).write_bytes(f.read_bytes())
    (fake / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EvaluatorError, match="refusing"):
        load_or_train(
            EvaluatorConfig(path=str(fake), **TINY),
            SceneCorpus(split="train"),
            SceneCorpus(split="val"),
            image_size=32,
            log=lambda s: None,
        )


def test_damaged_evaluator_folder(tmp_path):
    with pytest.raises(EvaluatorError, match="cannot load"):
        load_evaluators(tmp_path)


def test_text_only_corpus_has_no_pairs(tmp_path):
    class TextOnly:
        name = "textonly"

        def fingerprint(self):
            return "t"

        def document(self, i):
            from sparsefusion.data.documents import TEXT, Document, Segment

            return Document([Segment(TEXT, "words only")])

    with pytest.raises(EvaluatorError, match="too few caption-image pairs"):
        load_or_train(
            EvaluatorConfig(cache_dir=str(tmp_path), **TINY),
            TextOnly(),
            TextOnly(),
            image_size=32,
            log=lambda s: None,
        )


def test_missing_torchmetrics_message(trained, monkeypatch):
    _, ev, val = trained
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)
    with pytest.raises(ImportError, match="pip install"):
        fid_sf(ev.features, _set(val[:4]), _set(val[4:8]))


def test_bad_config_names_key():
    with pytest.raises(ValueError, match="eval.evaluator.epochs"):
        EvaluatorConfig(epochs=0)


def test_labels_are_scene_attributes_else_caption_words(trained):
    from PIL import Image

    from sparsefusion.eval.pairs import Pair, WordVocab

    _, ev, _ = trained
    assert ev.vocab.label_source == "attributes" and "shape:circle" in ev.vocab.labels
    im = Image.new("RGB", (8, 8))
    pairs = [Pair(im, f"a {c} shoe") for c in ("red", "blue") * 10]  # no attributes: words
    vocab = WordVocab.build(pairs, max_words=50, num_labels=10)
    assert vocab.label_source == "words" and set(vocab.labels) == {"red", "blue"}
    red = vocab.labels.index("red")
    targets = vocab.label_targets(pairs[:2])
    assert targets[0, red] == 1.0 and targets[1, red] == 0.0 and targets.sum() == 2.0
