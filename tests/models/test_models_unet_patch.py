"""U-Net patch layers (model.patch_layers=unet): shapes for every latent and patch size, images
stay independent, the grid is raster order, FLOPs equal a FLOP counter's, cached image passes
equal the full forward, and bad sizes fail naming the key."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sparsefusion.models.flops import patch_flops
from sparsefusion.models.inputs import ModelInputs, plan_for
from sparsefusion.models.transformer import ModelConfig
from sparsefusion.nn.unet_patch import UNetDown, UNetShape, UNetUp, unet_flops_per_image

pytest.importorskip("diffusers", reason="the transfusion extra is not installed")

SIZES = [(4, 1), (4, 2), (4, 4), (8, 2), (8, 4), (16, 2), (16, 8)]  # (latent side, patch side)


def _halves(latent: int, k: int, layers: int = 1, seed: int = 0):
    shape = UNetShape(3, latent, k, dim=24, width=8, layers=layers)
    torch.manual_seed(seed)
    down, up = UNetDown(shape), UNetUp(shape)
    down.init_weights(0.02)
    up.init_weights(0.02)
    return shape, down, up


def _run(down, up, patches_PC, t_P):
    h_PD, state = down(patches_PC, t_P)
    return h_PD, up(h_PD, state)


@pytest.mark.parametrize(("latent", "k"), SIZES)
def test_shapes_round_trip_for_every_latent_and_patch_size(latent, k):
    shape, down, up = _halves(latent, k)
    n = (latent // k) ** 2
    patches = torch.randn(2 * n, 3 * k * k)
    t = torch.tensor([100.0] * n + [900.0] * n)
    h_PD, pred_PC = _run(down, up, patches, t)
    assert h_PD.shape == (2 * n, 24) and pred_PC.shape == patches.shape
    assert shape.patches_per_image == n


def test_images_are_independent_and_the_grid_is_raster_order():
    shape, down, up = _halves(8, 2, layers=2)
    n = shape.patches_per_image
    patches = torch.randn(2 * n, 12)
    t = torch.tensor([300.0] * n + [700.0] * n)
    _, a = _run(down, up, patches, t)
    changed = patches.clone()
    changed[:n] += 1.0  # image 0 only
    _, b = _run(down, up, changed, t)
    torch.testing.assert_close(b[n:], a[n:])  # image 1 is untouched
    assert not torch.allclose(b[:n], a[:n])
    # The down half's positions come out in patchify's raster order: changing one patch moves
    # its own position most (the others only through GroupNorm statistics and the convolutions'
    # reach).
    shape, down, up = _halves(16, 2)
    n = shape.patches_per_image
    patches, t = torch.randn(n, 12), torch.full((n,), 500.0)
    h0, _ = down(patches, t)
    for p in (0, n - 1):  # a corner moves far more than the average and the opposite corner
        moved = patches.clone()
        moved[p] += 3.0
        h1, _ = down(moved, t)
        d_P = (h1 - h0).norm(dim=-1)
        assert d_P[p] > 2 * d_P.mean() and d_P[p] > 4 * d_P[n - 1 - p]


def test_the_timestep_changes_every_half():
    shape, down, up = _halves(8, 2)
    n = shape.patches_per_image
    patches = torch.randn(n, 12)
    h_a, state_a = down(patches, torch.full((n,), 10.0))
    h_b, state_b = down(patches, torch.full((n,), 900.0))
    assert not torch.allclose(h_a, h_b)
    assert not torch.allclose(up(h_a, state_a), up(h_a, state_b))  # t reaches the up half too


@pytest.mark.parametrize(("latent", "k", "layers"), [(8, 2, 1), (8, 1, 1), (8, 4, 2), (16, 2, 1)])
def test_flops_equal_a_flop_counter(latent, k, layers):
    shape, down, up = _halves(latent, k, layers)
    n = shape.patches_per_image
    with FlopCounterMode(display=False) as counter:
        _run(down, up, torch.randn(3 * n, 3 * k * k), torch.full((3 * n,), 5.0))
    assert counter.get_total_flops() == 3 * unet_flops_per_image(shape)


def _cfg(**kw) -> ModelConfig:
    base = dict(
        arch="mot", vocab_size=48, dim=32, num_layers=2, num_heads=4, multiple_of=8,
        latent_channels=2, patch_size=2, latent_size=4, patch_layers="unet", unet_width=8,
        qk_norm=False, norm_placement="pre", max_seq_len=64,
    )  # fmt: skip
    return ModelConfig(**{**base, **kw})


def test_model_flops_count_the_unet_per_image():
    cfg = _cfg()
    linear = ModelConfig(**{**cfg.__dict__, "patch_layers": "linear"})
    per_image = unet_flops_per_image(cfg.unet_shape())
    lm_head = 2 * cfg.dim * cfg.vocab_size
    assert patch_flops(cfg, 8) == 2 * per_image - 8 * lm_head
    assert patch_flops(linear, 8) != patch_flops(cfg, 8)


def test_unet_parameters_are_image_only_and_counted_once():
    dense, mot = _cfg(arch="dense").build(), _cfg().build()
    unet = {n for n, _ in dense.named_parameters() if n.startswith("patch_")}
    assert unet == {n for n, _ in mot.named_parameters() if n.startswith("patch_")}
    assert any(".resnets." in n for n in unet) and any("time_embed" in n for n in unet)
    assert isinstance(dense.patch_embed, UNetDown) and isinstance(dense.patch_head, UNetUp)


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"patch_layers": "conv"}, "model.patch_layers"),
        ({"latent_size": 6, "patch_size": 4}, "model.latent_size"),
        ({"latent_size": 6, "patch_size": 3}, "model.patch_size"),
        ({"unet_width": 0}, "model.unet_width"),
        ({"latent_size": -1}, "model.latent_size"),
    ],
)
def test_bad_unet_settings_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        _cfg(**kw)


def test_unet_without_a_latent_size_names_the_key():
    with pytest.raises(ValueError, match="model.latent_size"):
        _cfg(latent_size=0).build()


def test_cached_image_pass_equals_the_full_forward():
    from sparsefusion.generate import Decoder
    from sparsefusion.generate.span_samplers import patch_inputs
    from sparsefusion.tokenizers.vocab import UnifiedVocab

    vocab = UnifiedVocab({"text": 40, "image": 1})
    torch.manual_seed(0)
    model = _cfg(vocab_size=vocab.padded_size()).build()
    model.init_weights()
    model.eval()
    pid = vocab.offset("image")
    prompt = [vocab.bos_id, 20, 21, 22, vocab.boi_id]
    n = 4
    patches = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    dec = Decoder(model, vocab, batch=1, capacity=32)
    dec.step([prompt], commit=True)
    step = dict(span_ids=[[0] * n], **patch_inputs([0], [patches], n, 400))
    first = dec.step([[pid] * n], commit=False, **step).predictions["noise_PC"]
    ids = torch.tensor([prompt + [pid] * n])
    mods = vocab.modality_of(ids)
    T = ids.shape[1]
    full = model(
        ModelInputs(
            tokens_BT=ids,
            position_BT=torch.arange(T)[None],
            document_BT=torch.zeros(1, T, dtype=torch.long),
            plan=plan_for(model.cfg.tower_of_modality, model.cfg.num_towers, mods),
            modality_BT=mods,
            span_BT=torch.tensor([[-1] * len(prompt) + [0] * n]),
            patches_PC=patches,
            patch_slot_P=torch.arange(len(prompt), T),
            timestep_P=torch.full((n,), 400),
        )
    )
    torch.testing.assert_close(first, full.predictions["noise_PC"], atol=1e-5, rtol=1e-4)
