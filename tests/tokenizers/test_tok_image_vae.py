"""The VAE image tokenizer: training, crop/resize rule, save/load with hash checks, cache keys."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from sparsefusion.tokenizers.build import TokenizerConfig, cache_key, load_tokenizer
from sparsefusion.tokenizers.image_vae import ImageVAEConfig, VAEImageTokenizer, train_vae
from sparsefusion.tokenizers.text_bpe import BPETextTokenizer
from sparsefusion.tokenizers.transfusion import TransfusionTokenizer, TransfusionTokenizerError
from sparsefusion.tokenizers.vocab import UnifiedVocab

pytest.importorskip("diffusers", reason="the transfusion extra is not installed")

TINY = dict(channels=[8, 8], norm_groups=4, batch_size=8, held_out=8, image_size=16)


def _images(n: int, size: int = 16) -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g))
        im = Image.new("RGB", (size, size), colour)
        im.paste((255, 255, 255), (size // 4, size // 4, size // 2, size // 2))
        out.append(im)
    return out


def test_training_lowers_reconstruction_error_and_scales_latents():
    images = _images(48)
    _, before = train_vae(ImageVAEConfig(**TINY, train_steps=1), images)
    trained, report = train_vae(ImageVAEConfig(**TINY, train_steps=60), images)
    assert report["recon_mse"] < 0.8 * before["recon_mse"]  # deterministic (seeded): 0.074/0.110
    z = trained.encode(images[:40])
    assert z.shape == (40, 4, 8, 8)
    assert 0.5 < float(z.std()) < 2.0  # scaled to about unit variance


def test_images_of_other_sizes_are_cropped_and_resized_to_the_grid():
    vae = VAEImageTokenizer(ImageVAEConfig(**TINY)).eval()
    odd = Image.new("RGB", (40, 30), "red")
    assert vae.encode([odd]).shape == (1, 4, 8, 8)
    assert vae.decode(vae.encode([odd]))[0].size == (16, 16)


def _transfusion_tokenizer() -> TransfusionTokenizer:
    text = BPETextTokenizer.train(["a red circle above a blue square"] * 20, 260)
    vae = VAEImageTokenizer(ImageVAEConfig(**TINY)).eval()
    return TransfusionTokenizer(text, vae, UnifiedVocab({"text": text.vocab_size, "image": 1}))


def test_transfusion_tokenizer_round_trips_and_refuses_corruption(tmp_path):
    tok = _transfusion_tokenizer()
    tok.save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "manifest.json").read_text())["kind"] == "latent"
    again = load_tokenizer(tmp_path / "tok")
    assert isinstance(again, TransfusionTokenizer)
    images = _images(3)
    torch.testing.assert_close(again.vae.encode(images), tok.vae.encode(images))
    (tmp_path / "tok" / "image_vae.safetensors").write_bytes(b"broken")
    with pytest.raises(TransfusionTokenizerError, match="manifest hash"):
        load_tokenizer(tmp_path / "tok")


def test_documents_encode_to_boi_patches_eoi():
    from sparsefusion.data.documents import IMAGE, TEXT, Document, Segment

    tok = _transfusion_tokenizer()
    doc = Document(segments=[Segment(TEXT, "a red circle"), Segment(IMAGE, _images(1)[0])])
    (enc,) = tok.encode_latent_documents([doc], patch_size=2)
    b = enc.boi[0]
    assert enc.ids[b] == tok.vocab.boi_id and enc.ids[b + 17] == tok.vocab.eoi_id
    assert enc.ids[b + 1 : b + 17] == [tok.patch_id] * 16 and enc.modalities[b + 1] == 1
    assert enc.latents[0].shape == (4, 8, 8)
    with pytest.raises(ValueError, match="model.patch_size"):
        tok.patches_per_image(3)


def test_vq_cache_keys_ignore_the_vae_settings():
    class Src:
        name = "s"

        def fingerprint(self):
            return "f"

    a = cache_key(TokenizerConfig(), Src())
    b = cache_key(TokenizerConfig(vae=ImageVAEConfig(train_steps=7)), Src())
    c = cache_key(TokenizerConfig(image_kind="vae"), Src())
    d = cache_key(TokenizerConfig(image_kind="vae", vae=ImageVAEConfig(train_steps=7)), Src())
    assert a == b and len({a, c, d}) == 3
