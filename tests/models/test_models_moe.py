"""Sparse models: MoD equivalences, causal vs batch routing, moma-1t1i = FFN-only MoT, FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sparsefusion.models.flops import train_flops
from sparsefusion.models.inputs import ForwardContext, ModelInputs
from sparsefusion.models.transformer import ModelConfig
from sparsefusion.nn.aux_router import AuxRouters
from sparsefusion.nn.mod import MoDConfig, SequenceLayout, matched_num_layers
from sparsefusion.nn.moe import MoEConfig
from sparsefusion.nn.rope import rope_angles
from sparsefusion.nn.routing_context import RoutingContext
from sparsefusion.train.upcycle import upcycled_state_dict

B, T, V = 2, 12, 64


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, dim=32, num_layers=2, num_heads=4, multiple_of=8)
    if isinstance(kw.get("moe"), dict):
        kw["moe"] = MoEConfig(**kw["moe"])
    if isinstance(kw.get("mod"), dict):
        kw["mod"] = MoDConfig(**kw["mod"])
    return ModelConfig(**{**base, **kw})


def _model(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = cfg.build()
    model.init_weights()
    return model


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    modality = torch.tensor([[0] * 4 + [1] * 6 + [0] * 2, [1] * 3 + [0] * 9])
    document = torch.tensor([[0] * 7 + [1] * 5, [0] * 12])
    position = torch.tensor([list(range(7)) + list(range(5)), list(range(12))])
    return tokens, modality, document, position


def _forward(model, tokens, modality, document, position, **kw):
    plan = model.build_plan(modality)
    inputs = ModelInputs(tokens, position_BT=position, document_BT=document, plan=plan)
    return model(inputs, ForwardContext(**kw))


def _layout(cfg, document, position):
    return SequenceLayout(
        position_BT=position,
        document_BT=document,
        span_BT=None,
        document_masking=True,
        head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta,
    )


@pytest.mark.parametrize("arch", ["dense", "mot", "moma"])
def test_mod_at_capacity_one_equals_the_gated_dense_block(arch):
    kw = {"moe": {"experts": {"text": 1, "image": 1}}} if arch == "moma" else {}
    cfg = _cfg(arch=arch, mod=MoDConfig(enabled=True, capacity=1.0), **kw)
    model = _model(cfg)
    tokens, modality, document, position = _batch()
    plan = model.build_plan(modality)
    x = plan.sort(torch.randn(B * T, cfg.dim))
    layer, router = model.layers[0], model.mod_routers["0"]
    got, _ = router(
        layer, x, plan=plan, layout=_layout(cfg, document, position), ctx=RoutingContext()
    )
    mask = model.attention_mask(document)
    full, _ = layer(x, plan=plan, mask=mask, rope=rope_angles(position, cfg.head_dim))
    gate = torch.sigmoid(x @ router.weight[0])[:, None]
    torch.testing.assert_close(got, x + gate * (full - x), rtol=1e-5, atol=1e-6)


def test_mod_subset_equals_a_per_row_reference():
    cfg = _cfg(arch="mot", mod=MoDConfig(enabled=True, capacity=0.5))
    model = _model(cfg)
    tokens, modality, document, position = _batch()
    plan = model.build_plan(modality)
    x = torch.randn(B * T, cfg.dim)  # original order
    layer, router = model.layers[0], model.mod_routers["0"]
    ctx = RoutingContext(trace=True)
    layout = _layout(cfg, document, position)
    got, stats = router(layer, plan.sort(x), plan=plan, layout=layout, ctx=ctx)
    got = plan.unsort(got)
    selected = stats.records[0].target_nE[:, 0]  # plan-sorted
    selected = plan.unsort(selected[:, None])[:, 0].bool()
    assert int(selected.sum()) == B * T // 2
    gate_BT = torch.sigmoid(x @ router.weight[0]).view(B, T)
    for b in range(B):  # every row keeps its own top-k (k = capacity * T)
        row = set(selected.view(B, T)[b].nonzero().flatten().tolist())
        assert row == set(gate_BT[b].topk(T // 2).indices.tolist())
    expected = x.clone()
    gate = torch.sigmoid(x @ router.weight[0])
    for b in range(B):
        idx = [b * T + t for t in range(T) if selected[b * T + t]]  # original order
        sub = torch.tensor(idx)
        sub_plan = model.build_plan(modality.reshape(-1)[sub][None])
        xs = sub_plan.sort(x[sub])
        mask = model.attention_mask(document.reshape(-1)[sub][None])
        rope = rope_angles(position.reshape(-1)[sub][None], cfg.head_dim)
        out = sub_plan.unsort(layer(xs, plan=sub_plan, mask=mask, rope=rope)[0])
        expected[sub] = x[sub] + gate[sub, None] * (out - x[sub])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _causal_setup():
    cfg = _cfg(
        arch="moma",
        num_layers=3,
        moe={"experts": {"text": 4, "image": 4}},
        mod=MoDConfig(enabled=True, capacity=0.25),
    )
    model = _model(cfg).eval()
    torch.manual_seed(1)
    aux = AuxRouters(cfg.dim, model.router_sites())
    aux.init_weights(std=1.0)  # random but decisive per-token routing
    return model, aux


def test_causal_mode_ignores_later_tokens_and_batch_mode_does_not():
    model, aux = _causal_setup()
    tokens, modality, document, position = _batch()
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 7) % V  # rewrite every later token of every row
    with torch.no_grad():
        causal = [
            _forward(model, t, modality, document, position, routing_mode="causal", aux_routers=aux)
            for t in (tokens, changed)
        ]
        batch = [_forward(model, t, modality, document, position) for t in (tokens, changed)]
    early_c = [o.logits_BTV[:, :8] for o in causal]
    torch.testing.assert_close(early_c[0], early_c[1], rtol=0, atol=1e-6)
    sel = causal[0].metrics["mod/selected_frac"].item()
    assert 0 < sel < 1  # the aux routers really skip some tokens
    early_b = [o.logits_BTV[:, :8] for o in batch]
    assert (early_b[0] - early_b[1]).abs().max() > 1e-4  # batch top-k leaks the future


def test_router_sites_cover_expert_groups_and_mod_layers():
    model, aux = _causal_setup()
    sites = model.router_sites()
    assert sites == {
        "layer0_ffn_text": 4,
        "layer0_ffn_image": 4,
        "layer0_mod": 1,
        "layer1_ffn_text": 4,
        "layer1_ffn_image": 4,
        "layer2_ffn_text": 4,
        "layer2_ffn_image": 4,
        "layer2_mod": 1,
    }


def test_moma_1t1i_equals_ffn_only_mot_and_upcycled_4t4i_equals_its_seed():
    seed_cfg = _cfg(arch="mot", untie_attention=False, untie_norms=False, untie_qk_norm=False)
    seed = _model(seed_cfg)
    data = _batch()
    ref = _forward(seed, *data).logits_BTV
    for moe in (
        {"experts": {"text": 1, "image": 1}},  # one expert at capacity 1 = the FFN
        # every expert takes every token and softmax gates sum to 1: the copies add up to it
        {"experts": {"text": 4, "image": 4}, "capacity": 4.0, "gate": "softmax"},
    ):
        model = _model(_cfg(arch="moma", moe=moe), seed=5)
        model.load_state_dict(upcycled_state_dict(model, seed.state_dict()))
        torch.testing.assert_close(_forward(model, *data).logits_BTV, ref, rtol=1e-5, atol=1e-5)


def test_upcycling_from_dense_and_shape_mismatch():
    dense = _model(_cfg(arch="dense"))
    moe = _model(_cfg(arch="moe", moe={"num_experts": 2, "capacity": 2.0, "gate": "softmax"}))
    moe.load_state_dict(upcycled_state_dict(moe, dense.state_dict()))
    data = _batch()
    torch.testing.assert_close(
        _forward(moe, *data).logits_BTV, _forward(dense, *data).logits_BTV, rtol=1e-5, atol=1e-5
    )
    wide = _model(_cfg(arch="dense", dim=64))
    with pytest.raises(ValueError, match="shape mismatch"):
        upcycled_state_dict(moe, wide.state_dict())
    mot = _model(_cfg(arch="mot"))  # untied attention cannot feed shared attention
    with pytest.raises(ValueError, match="seed has no weight|shape mismatch"):
        upcycled_state_dict(
            _model(_cfg(arch="moma", moe={"experts": {"text": 2, "image": 2}})),
            {k: v for k, v in mot.state_dict().items() if "attention" not in k},
        )


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(arch="moma", moe={"experts": {"text": 4}}), "every moma group"),
        (dict(arch="moma", moe={"experts": {"text": 4, "image": 4, "audio": 2}}), "not towers"),
        (dict(arch="mot", moe={"experts": {"speech": 4}}), "not towers"),
        (dict(arch="moe", moe={"experts": {"text": 4}}), "num_experts"),
        (dict(arch="dense", moe={"experts": {"text": 4}}), "moma or mot"),
        (dict(arch="moma", moe={"experts": {"text": 2, "image": 4}, "capacity": 3.0}), "in .0, E"),
        (dict(arch="moe", moe={"num_experts": 8, "capacity": 9.0}), "capacity"),
        (dict(arch="moe", moe={"capacity": 0.0}), "capacity"),
        (dict(num_layers=1, mod={"enabled": True}), "at least 2 layers"),
        (dict(mod={"enabled": True, "first_layer": 5}), "no layer"),
        (dict(mod={"enabled": True, "capacity": 1.5}), "capacity"),
    ],
)
def test_bad_sparse_configs_fail_with_the_key(kw, match):
    from sparsefusion.config import ConfigError, from_dict

    with pytest.raises((ValueError, ConfigError), match=match):
        from_dict(ModelConfig, {"vocab_size": V, "dim": 32, "num_heads": 4, **kw})


def test_matched_mod_layers():
    mod = MoDConfig(enabled=True)
    assert matched_num_layers(4, mod) == 7  # 3 full + 4 quarter layers
    assert matched_num_layers(8, mod) == 14  # MoMa Table 1: the 8-layer dense -> 14 MoD layers
    assert matched_num_layers(2, mod) == 4


def _count(model, cfg, data):
    tokens, modality, document, position = data
    plan = model.build_plan(modality)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(ModelInputs(tokens, position_BT=position, document_BT=document, plan=plan))
        out.logits_BTV.square().mean().backward()
    return counter.get_total_flops(), plan.counts


@pytest.mark.parametrize(
    "kw",
    [
        dict(arch="moe", moe={"num_experts": 4}),
        dict(arch="moma", moe={"experts": {"text": 4, "image": 2}}),
        dict(arch="moma", moe={"experts": {"text": 3, "image": 1}, "capacity": 0.5}),
        dict(arch="mot", moe={"experts": {"text": 4}}),
        dict(arch="dense", num_layers=3, mod={"enabled": True}),
        dict(arch="moma", moe={"experts": {"text": 1, "image": 1}}, mod={"enabled": True}),
    ],
)
def test_sparse_train_flops_match_flop_counter(kw):
    cfg = _cfg(linear_impl="reference", **kw)
    model = _model(cfg)
    measured, counts = _count(model, cfg, _batch())
    expected = train_flops(cfg, _batch()[2], dense_attention=True, tower_counts=counts)
    assert measured == expected, (measured, expected)


def test_sparse_flops_count_processed_tokens_only():
    doc = torch.zeros(4, 32, dtype=torch.long)
    dense = _cfg(arch="dense")
    moe8 = _cfg(arch="moe", moe={"num_experts": 8})
    moe8_c2 = _cfg(arch="moe", moe={"num_experts": 8, "capacity": 2.0})
    tc2 = _cfg(arch="moe", moe={"num_experts": 8, "router": "token_choice", "top_k": 2})
    f = {n: train_flops(c, doc) for n, c in [("d", dense), ("e", moe8), ("e2", moe8_c2)]}
    f["tc2"] = train_flops(tc2, doc)
    ffn = 3 * 2 * 3 * dense.dim * dense.hidden_dim * 128 * dense.num_layers
    router = 3 * 2 * dense.dim * 8 * 128 * dense.num_layers
    assert f["e"] == f["d"] + router  # capacity 1: same expert compute as dense, plus routers
    assert f["e2"] == f["d"] + ffn + router
    assert f["tc2"] == f["d"] + ffn + router
    mod = _cfg(arch="dense", mod={"enabled": True, "capacity": 0.25})
    assert train_flops(mod, doc) < f["d"]
    with pytest.raises(ValueError, match="tower_counts"):
        train_flops(_cfg(arch="moma", moe={"experts": {"text": 2, "image": 2}}), doc)


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_moma_with_an_absent_modality_and_bf16_autocast(router):
    cfg = _cfg(
        arch="moma",
        moe={"experts": {"text": 4, "image": 4}, "router": router},
        mod={"enabled": True},
    )
    model = _model(cfg)
    tokens, _, document, position = _batch()
    text_only = torch.zeros_like(tokens)  # no image token at all: an empty expert group
    out = _forward(model, tokens, text_only, document, position)
    out.logits_BTV.sum().backward()
    assert torch.isfinite(out.logits_BTV).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _forward(model, tokens, _batch()[1], document, position)
    assert torch.isfinite(out.logits_BTV.float()).all()


def test_mod_reports_the_pairs_its_selected_tokens_attend():
    cfg = _cfg(arch="dense", num_layers=2, mod=MoDConfig(enabled=True, capacity=0.5))
    model = _model(cfg)
    tokens, modality, document, position = _batch()
    out = _forward(model, tokens, modality, document, position, trace=True)
    plan = model.build_plan(modality)
    selected = plan.unsort(out.records[0].target_nE)[:, 0].bool().view(B, T)
    expected = 0
    for b in range(B):
        for d in document[b].unique():
            m = int((selected[b] & (document[b] == d)).sum())
            expected += m * (m + 1) // 2
    assert out.metrics["mod/layer0_mod/pairs"].item() == expected
    assert selected.sum(1).tolist() == [T // 2] * B  # per-row capacity
