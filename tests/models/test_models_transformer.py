"""The decoder: MoT == dense when towers are equal, untie switches, packing, spans, references."""

from __future__ import annotations

import math

import pytest
import torch

from sparsefusion.models.flops import num_params
from sparsefusion.models.inputs import ModelInputs
from sparsefusion.models.transformer import ModelConfig, Transformer
from sparsefusion.nn.routing import build_plan

V, B, T = 64, 2, 12


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, dim=32, num_layers=2, num_heads=4, multiple_of=8)
    return ModelConfig(**{**base, **kw})


def _model(seed: int = 0, **kw) -> Transformer:
    model = _cfg(**kw).build()
    torch.manual_seed(seed)
    model.init_weights()
    return model


def _plan(cfg: ModelConfig, modality_BT: torch.Tensor):
    lut = torch.tensor(cfg.tower_of_modality)
    return build_plan(lut[modality_BT].reshape(-1), cfg.num_towers)


def _run(model, tokens, modality, position=None, document=None, span=None):
    b, t = tokens.shape
    position = torch.arange(t).expand(b, t) if position is None else position
    document = torch.zeros(b, t, dtype=torch.long) if document is None else document
    plan = _plan(model.cfg, modality)
    inputs = ModelInputs(
        tokens, position_BT=position, document_BT=document, plan=plan, span_BT=span
    )
    return model(inputs).logits_BTV


def _batch(seed: int = 0, num_modalities: int = 2):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    modality = torch.randint(0, num_modalities, (B, T), generator=g)
    return tokens, modality


# ---- naive per-position reference (independent of the sorted-order implementation) ----


def _pick(weight: torch.Tensor, tower: int) -> torch.Tensor:
    return weight[tower if weight.shape[0] > 1 else 0]


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x_HK: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    half = x_HK.shape[-1] // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float32) * 2 / x_HK.shape[-1])
    c, s = torch.cos(pos * freq), torch.sin(pos * freq)
    a, b = x_HK[..., :half], x_HK[..., half:]
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1)


def _naive_attention(layer, x, tower, position, allowed, cfg):
    H, J, K = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    att = layer.attention
    q, k, v = {}, {}, {}
    for (b, t), g in tower.items():
        qkv = _pick(att.wqkv.weight, g) @ x[b, t]
        q_, k_, v_ = (
            qkv[: H * K].view(H, K),
            qkv[H * K : (H + J) * K].view(J, K),
            qkv[(H + J) * K :],
        )
        if cfg.qk_norm:
            q_ = _rms(q_, _pick(att.q_norm.weight, g), cfg.norm_eps)
            k_ = _rms(k_, _pick(att.k_norm.weight, g), cfg.norm_eps)
        pos = int(position[b, t])
        q[b, t], k[b, t] = _rope(q_, pos, cfg.rope_theta), _rope(k_, pos, cfg.rope_theta)
        v[b, t] = v_.view(J, K)
    out = torch.zeros_like(x)
    for (b, t), g in tower.items():
        heads = []
        for h in range(H):
            j = h // (H // J)
            keys = [s for s in range(x.shape[1]) if allowed(b, t, s)]
            scores = torch.stack([q[b, t][h] @ k[b, s][j] for s in keys]) / math.sqrt(K)
            probs = torch.softmax(scores, 0)
            heads.append(sum(p * v[b, s][j] for p, s in zip(probs, keys, strict=True)))
        out[b, t] = _pick(att.wo.weight, g) @ torch.cat(heads)
    return out


def _naive_ffn(layer, x, tower):
    out = torch.zeros_like(x)
    for (b, t), g in tower.items():
        gate, up = (_pick(layer.feed_forward.w13.weight, g) @ x[b, t]).chunk(2)
        out[b, t] = _pick(layer.feed_forward.w2.weight, g) @ (torch.nn.functional.silu(gate) * up)
    return out


def _naive_norm(norm, x, tower, eps):
    out = torch.zeros_like(x)
    for (b, t), g in tower.items():
        out[b, t] = _rms(x[b, t], _pick(norm.weight, g), eps)
    return out


@torch.no_grad()
def naive_forward(model, tokens, modality, position, document, span=None):
    cfg = model.cfg
    lut = cfg.tower_of_modality
    tower = {(b, t): lut[int(modality[b, t])] for b in range(tokens.shape[0]) for t in range(T)}

    def allowed(b, q, k):
        if document[b, q] != document[b, k]:
            return False
        return k <= q or (span is not None and span[b, q] == span[b, k] >= 0)

    x = model.embedding.weight[tokens]
    for layer in model.layers:
        eps = cfg.norm_eps
        if cfg.norm_placement == "post":
            a = _naive_attention(layer, x, tower, position, allowed, cfg)
            h = x + _naive_norm(layer.attention_norm, a, tower, eps)
            x = h + _naive_norm(layer.ffn_norm, _naive_ffn(layer, h, tower), tower, eps)
        else:
            n = _naive_norm(layer.attention_norm, x, tower, eps)
            h = x + _naive_attention(layer, n, tower, position, allowed, cfg)
            x = h + _naive_ffn(layer, _naive_norm(layer.ffn_norm, h, tower, eps), tower)
    x = _rms(x, model.norm.weight[0], cfg.norm_eps)
    return x @ model.output.weight.T


@pytest.mark.parametrize(
    "kw",
    [
        dict(linear_impl="grouped", norm_placement="post"),
        dict(linear_impl="reference", norm_placement="pre", num_kv_heads=2),
        dict(
            modalities=["text", "image", "speech"],
            towers={"text": "lang", "image": "vision", "speech": "lang"},
            untie_ffn=False,
            qk_norm=False,
        ),
        dict(arch="dense"),
    ],
)
def test_model_equals_naive_per_position_reference(kw):
    model = _model(**kw)
    tokens, modality = _batch(1, len(model.cfg.modalities))
    document = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    position = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    position = torch.cat([position, torch.arange(12).unsqueeze(0)])
    span = torch.full((B, T), -1)
    span[1, 3:7] = 0  # a bidirectional span in row 1
    got = model(
        ModelInputs(
            tokens,
            position_BT=position,
            document_BT=document,
            plan=_plan(model.cfg, modality),
            span_BT=span,
        )
    ).logits_BTV
    want = naive_forward(model, tokens, modality, position, document, span)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_grouped_and_reference_models_agree_in_values_and_grads():
    grouped = _model(linear_impl="grouped")
    reference = _model(linear_impl="reference")
    reference.load_state_dict(grouped.state_dict())
    tokens, modality = _batch(2)
    y_g, y_r = _run(grouped, tokens, modality), _run(reference, tokens, modality)
    torch.testing.assert_close(y_g, y_r, atol=1e-5, rtol=1e-4)
    (y_g.square().mean()).backward()
    (y_r.square().mean()).backward()
    for (name, p_g), p_r in zip(grouped.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p_g.grad, p_r.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_mot_with_equal_towers_equals_dense(placement):
    dense = _model(arch="dense", norm_placement=placement)
    mot = _model(seed=1, arch="mot", norm_placement=placement)
    with torch.no_grad():
        for p_mot, p_dense in zip(mot.parameters(), dense.parameters(), strict=True):
            p_mot.copy_(p_dense.expand_as(p_mot))  # (1, ...) -> (G, ...): every tower = dense
    tokens, modality = _batch(3)
    y_dense, y_mot = _run(dense, tokens, modality), _run(mot, tokens, modality)
    torch.testing.assert_close(y_mot, y_dense, atol=1e-5, rtol=1e-5)
    y_dense.square().mean().backward()
    y_mot.square().mean().backward()
    for (name, p_mot), p_dense in zip(mot.named_parameters(), dense.parameters(), strict=True):
        # Tower parameters are (G, ...) vs dense (1, ...): the dense grad is the sum over towers.
        grad_mot = p_mot.grad if p_mot.shape == p_dense.shape else p_mot.grad.sum(0, keepdim=True)
        torch.testing.assert_close(grad_mot, p_dense.grad, atol=1e-6, rtol=1e-4, msg=name)


_SWITCH_PARAMS = {
    "untie_attention": ["attention.wqkv.weight", "attention.wo.weight"],
    "untie_ffn": ["feed_forward.w13.weight", "feed_forward.w2.weight"],
    "untie_norms": ["attention_norm.weight", "ffn_norm.weight"],
    "untie_qk_norm": ["attention.q_norm.weight", "attention.k_norm.weight"],
}


def test_all_tied_mot_has_dense_parameter_count_and_each_switch_adds_one_tower():
    tied = dict.fromkeys(_SWITCH_PARAMS, False)
    dense_count = num_params(_model(arch="dense"))
    assert num_params(_model(**tied)) == dense_count
    for switch, names in _SWITCH_PARAMS.items():
        model = _model(**{**tied, switch: True})
        layer = model.layers[0]
        extra = sum(layer.get_parameter(n)[0].numel() for n in names) * model.cfg.num_layers
        assert num_params(model) == dense_count + extra, switch
        for n in names:
            assert layer.get_parameter(n).shape[0] == 2
        for other, other_names in _SWITCH_PARAMS.items():
            if other != switch:
                assert all(layer.get_parameter(n).shape[0] == 1 for n in other_names)


@pytest.mark.parametrize("switch", list(_SWITCH_PARAMS))
def test_untied_image_weights_only_affect_positions_that_see_images(switch):
    model = _model(**{**dict.fromkeys(_SWITCH_PARAMS, False), switch: True})
    tokens, _ = _batch(4)
    modality = torch.zeros(B, T, dtype=torch.long)
    modality[:, 6:9] = 1  # image tokens at 6..8
    before = _run(model, tokens, modality).detach()
    with torch.no_grad():
        for n in _SWITCH_PARAMS[switch]:
            model.layers[0].get_parameter(n)[1].mul_(1.5).add_(0.1)
    after = _run(model, tokens, modality).detach()
    torch.testing.assert_close(after[:, :6], before[:, :6], atol=0, rtol=0)
    assert (after[:, 6:9] - before[:, 6:9]).abs().amax() > 1e-4
    # A text-tower perturbation changes text positions from the start.
    with torch.no_grad():
        model.layers[0].get_parameter(_SWITCH_PARAMS[switch][0])[0].mul_(1.5).add_(0.1)
    assert (_run(model, tokens, modality)[:, :6] - after[:, :6]).abs().amax() > 1e-4


def _embedding_grads(model, tokens, modality, position, document, span, select):
    """Gradient of sum(logits[select]) w.r.t. the embedding output, (B, T, D), original order.

    The model looks the embeddings up in plan-sorted order; the plan's unsort maps them back.
    """
    store = {}

    def hook(_module, _inputs, out):
        out.retain_grad()
        store["emb"] = out

    handle = model.embedding.register_forward_hook(hook)
    logits = _run(model, tokens, modality, position, document, span)
    handle.remove()
    logits[select].sum().backward()
    grad_ND = _plan(model.cfg, modality).unsort(store["emb"].grad)
    return grad_ND.view(*tokens.shape, -1)


def test_packed_row_equals_documents_run_alone_and_never_crosses():
    model = _model()
    tokens, modality = _batch(5)
    tokens, modality = tokens[:1], modality[:1]
    document = torch.tensor([[0] * 5 + [1] * 7])
    position = torch.tensor([list(range(5)) + list(range(7))])
    packed = _run(model, tokens, modality, position, document)
    alone0 = _run(model, tokens[:, :5], modality[:, :5])
    alone1 = _run(model, tokens[:, 5:], modality[:, 5:])
    torch.testing.assert_close(packed, torch.cat([alone0, alone1], dim=1), atol=1e-5, rtol=1e-5)
    grad = _embedding_grads(
        model, tokens, modality, position, document, None, (slice(None), slice(5, None))
    )
    assert grad[:, :5].abs().amax() == 0
    assert grad[:, 5:].abs().amax() > 0


def test_document_masking_off_is_plain_causal():
    masked, causal = _model(), _model(document_masking=False)
    tokens, modality = _batch(6)
    mask = causal.attention_mask(torch.zeros(B, T, dtype=torch.long))
    assert mask.is_causal and mask.allowed_B1TT is None
    torch.testing.assert_close(
        _run(masked, tokens, modality), _run(causal, tokens, modality), atol=1e-6, rtol=1e-5
    )


def test_span_is_bidirectional_inside_and_causal_outside():
    model = _model()
    tokens, modality = _batch(7)
    tokens, modality = tokens[:1], modality[:1]
    span = torch.full((1, T), -1)
    span[0, 4:8] = 0

    def grad_of(query: int) -> torch.Tensor:
        model.zero_grad()
        select = (slice(None), slice(query, query + 1))
        g = _embedding_grads(model, tokens, modality, None, None, span, select)
        return g[0].abs().sum(-1)

    g5 = grad_of(5)
    assert g5[6] > 0 and g5[7] > 0  # later positions of the same span
    assert g5[3] > 0  # earlier positions as usual
    assert g5[8:].amax() == 0  # nothing after the span
    g3 = grad_of(3)
    assert g3[4:].amax() == 0  # before the span: causal


def test_meta_device_init_matches_eager_init():
    cfg = _cfg()
    with torch.device("meta"):
        meta = cfg.build()
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    eager = _model(seed=0)
    for (name, a), b in zip(meta.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    tokens, modality = _batch(8)
    assert torch.isfinite(_run(meta, tokens, modality)).all()


def test_init_weights_statistics():
    model = _cfg(dim=128, num_heads=4, num_layers=4, vocab_size=512).build()
    torch.manual_seed(0)
    model.init_weights()
    std = model.cfg.init_std
    layer = model.layers[0]
    assert abs(layer.attention.wqkv.weight.std().item() - std) < 1e-3
    assert abs(layer.feed_forward.w2.weight.std().item() - std / math.sqrt(8)) < 1e-3
    towers = layer.feed_forward.w13.weight
    assert not torch.equal(towers[0], towers[1])  # towers drawn independently
    assert torch.equal(layer.ffn_norm.weight, torch.ones_like(layer.ffn_norm.weight))


def test_config_towers_and_validation():
    cfg = _cfg(
        modalities=["text", "image", "speech"], towers={"text": "a", "image": "b", "speech": "a"}
    )
    assert cfg.tower_names == ["a", "b"] and cfg.tower_of_modality == [0, 1, 0]
    assert cfg.num_towers == 2
    assert _cfg().tower_names == ["text", "image"] and _cfg().tower_of_modality == [0, 1]
    assert _cfg(arch="dense").tower_of_modality == [0, 0]
    assert _cfg(num_kv_heads=2).kv_heads == 2 and _cfg().kv_heads == 4
    bad = [
        (dict(dim=30), "num_heads"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(modalities=[]), "modalities"),
        (dict(modalities=["text", "text"]), "modalities"),
        (dict(towers={"audio": "x"}), "towers"),
        (dict(towers={"text": "x"}), "missing"),
        (dict(arch="moex"), "arch"),
        (dict(norm_placement="sandwich"), "norm_placement"),
        (dict(init_std=0.0), "init_std"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(dim=24, num_heads=8), "even"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            _cfg(**kw)
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig(dim=32, num_layers=1, num_heads=4).build()
    with pytest.warns(UserWarning, match="ignored"):
        _cfg(arch="dense", towers={"text": "a", "image": "a"})


def test_forward_rejects_a_plan_of_the_wrong_shape():
    model = _model()
    tokens, modality = _batch(9)
    wrong = build_plan(torch.zeros(B * T - 1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="plan"):
        model(ModelInputs(tokens, position_BT=tokens, document_BT=tokens * 0, plan=wrong))
    plan = model.build_plan(modality)
    assert plan.counts == tuple(torch.bincount(modality.reshape(-1), minlength=2).tolist())


def test_cpu_bf16_autocast_runs_grouped_path_close_to_fp32():
    model = _model()
    tokens, modality = _batch(10)
    ref = _run(model, tokens, modality).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(model, tokens, modality)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    out.float().square().mean().backward()
    grad = model.layers[0].feed_forward.w13.weight.grad
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0
