"""VQ image tokenizer: shapes, training reduces error, dead-code restart, save/load."""

import random

import pytest
import torch
from PIL import Image, ImageDraw

from sparsefusion.tokenizers.image_vq import (
    EMACodebook,
    ImageVQConfig,
    VQImageTokenizer,
    evaluate_vq,
    images_to_tensor,
    train_vq,
)

COLOURS = [
    (230, 30, 30),
    (30, 200, 40),
    (40, 60, 220),
    (240, 220, 30),
    (20, 20, 20),
    (250, 250, 250),
]


def squares(n: int, size: int = 16, seed: int = 0) -> list[Image.Image]:
    """Solid-colour squares on a plain background of another colour."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        bg, fg = rng.sample(COLOURS, 2)
        img = Image.new("RGB", (size, size), bg)
        side = rng.randint(size // 4, size // 2)
        x, y = rng.randint(0, size - side), rng.randint(0, size - side)
        ImageDraw.Draw(img).rectangle([x, y, x + side - 1, y + side - 1], fill=fg)
        out.append(img)
    return out


def tiny_cfg(**kw) -> ImageVQConfig:
    base = dict(
        image_size=16,
        downsample=4,
        codebook_size=32,
        code_dim=8,
        hidden=32,
        num_res_blocks=1,
        train_steps=300,
        batch_size=32,
        lr=3e-3,
        held_out=32,
    )
    return ImageVQConfig(**(base | kw))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return train_vq(tiny_cfg(), squares(320), progress=False)


def test_tok_vq_shapes_and_resize():
    torch.manual_seed(0)
    vq = VQImageTokenizer(tiny_cfg()).eval()
    assert vq.tokens_per_image == 16 and vq.codebook_size == 32 and vq.image_size == 16
    imgs = squares(3) + [Image.new("L", (40, 24), 128)]  # grey, wrong size: converted + resized
    codes = vq.encode(imgs)
    assert codes.shape == (4, 16) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    out = vq.decode(codes)
    assert len(out) == 4 and all(o.size == (16, 16) and o.mode == "RGB" for o in out)
    assert vq.encode([]).shape == (0, 16)
    with pytest.raises(ValueError, match="codes must"):
        vq.decode(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="codes must lie"):
        vq.decode(torch.full((1, 16), 32))


def test_tok_vq_training_reduces_error(trained):
    vq, report = trained
    held = images_to_tensor(squares(64, seed=1), 16)
    torch.manual_seed(0)
    init = evaluate_vq(VQImageTokenizer(tiny_cfg()), held)
    after = evaluate_vq(vq, held)
    assert after["recon_mse"] < 0.15 * init["recon_mse"], (init, after)
    assert after["recon_mse"] < 0.025
    assert set(report) >= {"recon_mse", "codebook_usage", "perplexity"}
    assert 0.0 < report["codebook_usage"] <= 1.0 and report["perplexity"] >= 1.0


def test_tok_vq_codebook_usage_with_restart(trained):
    _, report = trained
    assert report["codebook_usage"] >= 0.5, report


def test_tok_vq_restart_dead_codes():
    cb = EMACodebook(8, 4, decay=0.99)
    gen = torch.Generator().manual_seed(0)
    z = torch.arange(40, dtype=torch.float).view(10, 4) + 100.0
    cb.init_from(z, gen)
    cb.cluster_size_K.copy_(torch.tensor([5.0, 0.1, 5.0, 0.0, 5.0, 5.0, 0.5, 5.0]))
    before = cb.embed_KD.clone()
    assert cb.restart_dead(z, threshold=1.0, gen=gen) == 3
    for k in range(8):
        if k in (1, 3, 6):
            assert any(torch.equal(cb.embed_KD[k], row) for row in z)
            assert cb.cluster_size_K[k] == 1.0
        else:
            assert torch.equal(cb.embed_KD[k], before[k])
    # EMA moves a code to the mean of its assigned vectors
    codes = torch.zeros(10, dtype=torch.long)
    for _ in range(2000):
        cb.ema_update(z, codes)
    assert torch.allclose(cb.embed_KD[0], z.mean(0), rtol=1e-3)


def test_tok_vq_save_load(trained, tmp_path):
    vq, _ = trained
    vq.save(tmp_path / "vq.safetensors")
    assert (tmp_path / "vq.json").is_file()
    again = VQImageTokenizer.load(tmp_path / "vq")
    assert again.cfg == vq.cfg
    imgs = squares(8, seed=2)
    codes = vq.encode(imgs)
    assert torch.equal(again.encode(imgs), codes)
    a, b = vq.decode(codes), again.decode(codes)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))


def test_tok_vq_callable_source():
    cfg = tiny_cfg(train_steps=3, held_out=8)
    vq, report = train_vq(cfg, lambda n: squares(n, seed=n), progress=False)
    assert report["recon_mse"] >= 0 and vq.tokens_per_image == 16


def test_tok_vq_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        ImageVQConfig(image_size=30, downsample=4)
    with pytest.raises(ValueError, match="decay"):
        ImageVQConfig(decay=1.0)
    with pytest.raises(ValueError, match="codebook_size"):
        ImageVQConfig(codebook_size=0)
