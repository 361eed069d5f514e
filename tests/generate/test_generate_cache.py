"""Cached incremental decoding gives the logits of one full causal-mode forward, every arch."""

from __future__ import annotations

import pytest
import torch
from generate_archs import ARCHS, VOCAB, tiny_model

from sparsefusion.generate.engine import Decoder, MissingAuxRouters, sequence_inputs
from sparsefusion.models.inputs import ForwardContext

EOS, BOI, EOI = VOCAB.eos_id, VOCAB.boi_id, VOCAB.eoi_id


def _sequences() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    text = lambda n: (torch.randint(16, 56, (n,), generator=g)).tolist()  # noqa: E731
    image = lambda n: (torch.randint(56, 76, (n,), generator=g)).tolist()  # noqa: E731
    one = [1, *text(5), BOI, *image(6), EOI, *text(4)]
    two_docs = [1, *text(6), EOS, 1, *text(3), BOI, *image(5), EOI, *text(3)]  # two documents
    short = [1, *image(3), *text(9)]
    return [one, two_docs, short]


def _full_logits(model, aux, ids: list[int]) -> torch.Tensor:
    ctx = ForwardContext(routing_mode="causal", aux_routers=aux)
    return model(sequence_inputs(model, VOCAB, ids), ctx).logits_BTV[0]


def _cached_logits(model, aux, seqs, prompt_lens) -> list[torch.Tensor]:
    dec = Decoder(model, VOCAB, batch=len(seqs), capacity=64, aux_routers=aux)
    prompts = [s[:n] for s, n in zip(seqs, prompt_lens, strict=True)]
    logits = dec.extend(prompts)
    out = [[logits[b, : len(p)]] for b, p in enumerate(prompts)]
    pos = list(prompt_lens)
    while any(p < len(s) for p, s in zip(pos, seqs, strict=True)):
        new = [[s[p]] if p < len(s) else [] for p, s in zip(pos, seqs, strict=True)]
        logits = dec.extend(new)
        for b, ids in enumerate(new):
            if ids:
                out[b].append(logits[b, :1])
                pos[b] += 1
    assert [len(r.ids) for r in dec.rows] == [len(s) for s in seqs]
    return [torch.cat(parts) for parts in out]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cached_decoding_matches_full_forward(arch):
    model, aux = tiny_model(arch)
    seqs = _sequences()
    cached = _cached_logits(model, aux, seqs, prompt_lens=[7, 4, 2])
    for ids, got in zip(seqs, cached, strict=True):
        want = _full_logits(model, aux, ids)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_mod_cache_holds_only_processed_tokens():
    model, aux = tiny_model("mod")
    seqs = _sequences()
    dec = Decoder(model, VOCAB, batch=3, capacity=64, aux_routers=aux)
    dec.extend(seqs)
    full, routed = dec.cache.lengths(1), dec.cache.lengths(0)
    assert full == [len(s) for s in seqs]
    assert all(0 < r < f for r, f in zip(routed, full, strict=True)), (routed, full)


def test_uncommitted_step_leaves_the_cache_unchanged():
    model, aux = tiny_model("mot")
    seqs = _sequences()
    dec = Decoder(model, VOCAB, batch=3, capacity=64, aux_routers=aux)
    dec.extend([s[:5] for s in seqs])
    probe = dec.extend([s[5:9] for s in seqs], commit=False)
    assert dec.cache.lengths(0) == [5, 5, 5]
    again = dec.extend([s[5:9] for s in seqs])
    torch.testing.assert_close(probe, again, atol=0, rtol=0)
    assert dec.cache.lengths(0) == [9, 9, 9]


def test_batch_routed_model_without_aux_routers_names_the_command():
    model, _ = tiny_model("moe_ec")
    with pytest.raises(MissingAuxRouters, match="sparsefusion train-aux runs/x"):
        Decoder(model, VOCAB, batch=1, capacity=8, run_dir="runs/x")
    tc, aux = tiny_model("moe_tc")
    assert aux is None
    Decoder(tc, VOCAB, batch=1, capacity=8)  # token choice is causal already


def test_cache_never_grows_past_its_capacity():
    model, aux = tiny_model("dense")
    dec = Decoder(model, VOCAB, batch=1, capacity=6)
    dec.extend([[1, 20, 21, 22, 23]])
    with pytest.raises(ValueError, match="cache holds 6"):
        dec.extend([[24, 25]])
    two = Decoder(model, VOCAB, batch=2, capacity=6)
    two.extend([[1, 20, 21, 22, 23, 24], [1, 20]])
    for _ in range(4):  # the full row gets filler while the other row fills up
        two.extend([[], [30]])
    assert [len(r.ids) for r in two.rows] == [6, 6]
    with pytest.raises(ValueError, match="max_seq_len"):
        Decoder(model, VOCAB, batch=1, capacity=10_000)


@pytest.mark.parametrize("arch", ["mot", "moma_mod"])
def test_bidirectional_span_against_the_cache_matches_full_forward(arch):
    """A span (e.g. Transfusion's image patches) run in one extend call, re-run uncommitted."""
    model, aux = tiny_model(arch)
    ids = _sequences()[0]
    lo, hi = 6, 12  # the image codes form one bidirectional span
    span = [-1] * len(ids)
    span[lo:hi] = [0] * (hi - lo)
    inputs = sequence_inputs(model, VOCAB, ids)
    inputs.span_BT = torch.tensor([span])
    ctx = ForwardContext(routing_mode="causal", aux_routers=aux)
    want = model(inputs, ctx).logits_BTV[0]
    dec = Decoder(model, VOCAB, batch=1, capacity=64, aux_routers=aux)
    parts = [dec.extend([ids[:lo]])[0]]
    for _ in range(2):  # denoising passes: the span against the cached prefix, not kept
        dec.extend([ids[lo:hi]], span_ids=[span[lo:hi]], commit=False)
    parts.append(dec.extend([ids[lo:hi]], span_ids=[span[lo:hi]])[0])
    parts += [dec.extend([[i]])[0] for i in ids[hi:]]
    torch.testing.assert_close(torch.cat(parts), want, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mot", "moma_mod", "moe_tc"])
def test_cached_decoding_matches_full_forward_on_cuda(arch):
    model, aux = tiny_model(arch)
    model.cuda()
    if aux is not None:
        aux.cuda()
    seqs = _sequences()
    cached = _cached_logits(model, aux, seqs, prompt_lens=[7, 4, 2])
    for ids, got in zip(seqs, cached, strict=True):
        want = model(
            sequence_inputs(model, VOCAB, ids).to("cuda"),
            ForwardContext(routing_mode="causal", aux_routers=aux),
        ).logits_BTV[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
