"""Attention masks (document, causal, spans), SDPA fast path and RoPE."""

from __future__ import annotations

import pytest
import torch

from sparsefusion.nn.attention import AttentionMask, build_attention_mask, sdpa
from sparsefusion.nn.rope import apply_rope, rope_angles


def _brute_force_mask(document_BT, span_BT):
    B, T = document_BT.shape
    out = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for q in range(T):
            for k in range(T):
                same_doc = document_BT[b, q] == document_BT[b, k]
                same_span = span_BT is not None and span_BT[b, q] == span_BT[b, k] >= 0
                out[b, 0, q, k] = bool(same_doc and (k <= q or same_span))
    return out


@pytest.mark.parametrize("with_spans", [False, True])
def test_mask_matches_rule(with_spans):
    document = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0, 1, 1]])
    span = torch.tensor([[-1, 0, 0, -1, 1, 1, 1, -1], [-1, 3, 3, 3, -1, 4, 4, -1]])
    span = span if with_spans else None
    mask = build_attention_mask(document, span)
    assert mask.allowed_B1TT.shape == (2, 1, 8, 8) and not mask.is_causal
    assert torch.equal(mask.allowed_B1TT, _brute_force_mask(document, span))
    if with_spans:
        assert mask.allowed_B1TT[0, 0, 1, 2]  # earlier span token sees a later one
        assert not mask.allowed_B1TT[1, 0, 5, 6]  # span 4 crosses into document 1: cut
        assert not mask.allowed_B1TT[0, 0, 0, 1]  # outside spans: causal


def test_attention_mask_requires_one_mode():
    with pytest.raises(ValueError):
        AttentionMask()
    with pytest.raises(ValueError):
        AttentionMask(allowed_B1TT=torch.ones(1, 1, 2, 2, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="span_BT"):
        build_attention_mask(torch.zeros(2, 4), torch.zeros(2, 3))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_causal_fast_path_equals_single_document_mask(kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 8)
    k, v = torch.randn(2, kv_heads, 6, 8), torch.randn(2, kv_heads, 6, 8)
    dense = sdpa(q, k, v, build_attention_mask(torch.zeros(2, 6, dtype=torch.long)))
    fast = sdpa(q, k, v, AttentionMask.causal())
    torch.testing.assert_close(dense, fast, atol=1e-6, rtol=1e-5)
    # GQA: query head h uses key/value head h // (H / J).
    rep = 4 // kv_heads
    full = sdpa(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), AttentionMask.causal())
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pos_q: int, pos_k: int) -> torch.Tensor:
        rq = apply_rope(q, rope_angles(torch.tensor([[pos_q]]), 16))
        rk = apply_rope(k, rope_angles(torch.tensor([[pos_k]]), 16))
        return (rq * rk).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100), atol=1e-4, rtol=1e-4)
    by_offset = torch.stack([score(9, 9 - d) for d in range(6)])
    assert by_offset.std() > 1e-2  # the score does change with the distance
    # Position 0 is the identity; rotations preserve the norm.
    torch.testing.assert_close(apply_rope(q, rope_angles(torch.tensor([[0]]), 16)), q)
    rotated = apply_rope(q, rope_angles(torch.tensor([[55]]), 16))
    torch.testing.assert_close(rotated.norm(), q.norm())


def test_rope_matches_explicit_formula():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 1, 8)
    pos, theta = 5, 10000.0
    out = apply_rope(x, rope_angles(torch.tensor([[pos]]), 8, theta))[0, 0, 0]
    v = x[0, 0, 0]
    for i in range(4):
        a = pos * theta ** (-2 * i / 8)
        c, s = torch.cos(torch.tensor(a)), torch.sin(torch.tensor(a))
        torch.testing.assert_close(out[i], v[i] * c - v[i + 4] * s)
        torch.testing.assert_close(out[i + 4], v[i + 4] * c + v[i] * s)
    with pytest.raises(ValueError, match="even"):
        rope_angles(torch.tensor([[0]]), 7)
