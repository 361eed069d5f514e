"""The model in the Transfusion setting: patch embedder/head, the intra-image bidirectional mask,
LM head on discrete positions only, tied MoT == dense, and FLOPs of patches and spans."""

from __future__ import annotations

import pytest
import torch

from sparsefusion.models.flops import forward_flops, span_pairs
from sparsefusion.models.inputs import ModelInputs, plan_for
from sparsefusion.models.transformer import ModelConfig, Transformer
from sparsefusion.nn.patch_embed import patchify, unpatchify

V, C = 48, 8  # vocab; values per patch (2 channels x 2 x 2)
# One row, two documents: [BOS t t BOI p p p p EOI t] [BOS t BOI p p p p EOI].
TOKENS = [1, 20, 21, 3, 40, 40, 40, 40, 4, 22, 1, 23, 3, 40, 40, 40, 40, 4]
MODS = [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0]
DOCS = [0] * 10 + [1] * 8
SPAN = [-1] * 4 + [0] * 4 + [-1] * 5 + [1] * 4 + [-1]
SLOTS = [4, 5, 6, 7, 13, 14, 15, 16]


def _model(seed: int = 0, **kw) -> Transformer:
    base = dict(vocab_size=V, dim=32, num_layers=2, num_heads=4, multiple_of=8)
    cfg = ModelConfig(
        **{
            **base,
            "latent_channels": 2,
            "patch_size": 2,
            "qk_norm": False,
            "norm_placement": "pre",
            **kw,
        }
    )
    torch.manual_seed(seed)
    model = cfg.build()
    model.init_weights()
    return model


def _inputs(model: Transformer, patches_PC: torch.Tensor, tokens=None) -> ModelInputs:
    mods = torch.tensor([MODS])
    pos = torch.tensor([list(range(10)) + list(range(8))])
    return ModelInputs(
        tokens_BT=torch.tensor([tokens or TOKENS]),
        position_BT=pos,
        document_BT=torch.tensor([DOCS]),
        plan=plan_for(model.cfg.tower_of_modality, model.cfg.num_towers, mods),
        modality_BT=mods,
        span_BT=torch.tensor([SPAN]),
        patches_PC=patches_PC,
        patch_slot_P=torch.tensor(SLOTS),
        timestep_P=torch.tensor([300] * 4 + [700] * 4),
    )


def _patches(seed: int = 0) -> torch.Tensor:
    return torch.randn(8, C, generator=torch.Generator().manual_seed(seed))


def test_patchify_is_raster_order_and_inverts():
    x = torch.arange(2 * 4 * 4, dtype=torch.float).view(1, 2, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (1, 4, 8)
    assert p[0, 1, :4].tolist() == [2, 3, 6, 7]  # second patch: top row, columns 2-3
    torch.testing.assert_close(unpatchify(p, 2, (2, 4, 4)), x)


def test_patches_see_their_whole_image_and_text_never_sees_the_future():
    model = _model()
    base = _patches()
    out = model(_inputs(model, base))
    assert out.predictions["noise_PC"].shape == (8, C)
    assert bool((out.logits_BTV[0, SLOTS] == 0).all())  # no LM head on patches
    changed = base.clone()
    changed[3] += 1.0  # the last patch of image 0
    out2 = model(_inputs(model, changed))
    noise, noise2 = out.predictions["noise_PC"], out2.predictions["noise_PC"]
    assert not torch.allclose(noise[0], noise2[0])  # an earlier patch of the same image sees it
    torch.testing.assert_close(out.logits_BTV[0, :4], out2.logits_BTV[0, :4])  # text before
    torch.testing.assert_close(noise[4:], noise2[4:])  # nothing crosses documents
    torch.testing.assert_close(out.logits_BTV[0, 10:], out2.logits_BTV[0, 10:])
    assert not torch.allclose(out.logits_BTV[0, 8:10], out2.logits_BTV[0, 8:10])  # EOI, text after
    later = list(TOKENS)
    later[9] = 25  # the text token after image 0
    out3 = model(_inputs(model, base, tokens=later))
    torch.testing.assert_close(out.logits_BTV[0, :9], out3.logits_BTV[0, :9])
    torch.testing.assert_close(noise, out3.predictions["noise_PC"])


def test_timestep_changes_the_prediction():
    model = _model()
    inputs = _inputs(model, _patches())
    a = model(inputs).predictions["noise_PC"]
    inputs.timestep_P = torch.tensor([10] * 8)
    assert not torch.allclose(a, model(inputs).predictions["noise_PC"])


UNET = {"patch_layers": "unet", "latent_size": 4, "unet_width": 8}
GRADS = {  # a weight of each patch half whose gradients must agree
    "linear": ("patch_embed.proj.weight", "patch_head.proj.weight"),
    "unet": ("patch_embed.conv_in.weight", "patch_head.conv_out.weight"),
}


@pytest.mark.parametrize(
    ("placement", "layers"), [("pre", "linear"), ("post", "linear"), ("pre", "unet")]
)
def test_mot_with_tied_towers_equals_dense_with_patches(placement, layers):
    kw = {"norm_placement": placement, **(UNET if layers == "unet" else {})}
    dense = _model(arch="dense", **kw)
    mot = _model(seed=1, arch="mot", **kw)
    with torch.no_grad():
        for p_mot, p_dense in zip(mot.parameters(), dense.parameters(), strict=True):
            p_mot.copy_(p_dense.expand_as(p_mot))
    patches = _patches(2)
    a, b = dense(_inputs(dense, patches)), mot(_inputs(mot, patches))
    torch.testing.assert_close(b.logits_BTV, a.logits_BTV, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        b.predictions["noise_PC"], a.predictions["noise_PC"], atol=1e-5, rtol=1e-5
    )
    (a.predictions["noise_PC"].square().mean() + a.logits_BTV.square().mean()).backward()
    (b.predictions["noise_PC"].square().mean() + b.logits_BTV.square().mean()).backward()
    grads = dict(dense.named_parameters())
    for name in GRADS[layers]:
        torch.testing.assert_close(
            dict(mot.named_parameters())[name].grad, grads[name].grad, atol=1e-6, rtol=1e-4
        )


def test_patch_layers_exist_only_with_latents_and_are_the_image_specific_weights():
    plain = _model(arch="dense", latent_channels=0)
    assert plain.patch_embed is None and plain.patch_head is None
    dense = _model(arch="dense")
    extra = {n for n in dict(dense.named_parameters()) if n.startswith("patch_")}
    assert extra and all(n.startswith(("patch_embed.", "patch_head.")) for n in extra)
    with pytest.raises(ValueError, match="latent_channels"):
        plain(_inputs(plain, _patches()))


def test_flops_count_bidirectional_pairs_and_patch_layers():
    span = torch.tensor([SPAN])
    assert span_pairs(span) == 2 * (4 * 3 // 2)
    assert span_pairs(None) == 0
    model = _model(arch="dense")
    docs = torch.tensor([DOCS])
    plain = forward_flops(model.cfg, docs)
    with_span = forward_flops(model.cfg, docs, span_BT=span)
    cfg = model.cfg
    assert with_span - plain == cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * 12
    with_patches = forward_flops(model.cfg, docs, span_BT=span, num_patches=8)
    per_patch = 2 * (C * 32 + 128 * 32 + 32 * 32) + 2 * 32 * C - 2 * 32 * V
    assert with_patches - with_span == 8 * per_patch
