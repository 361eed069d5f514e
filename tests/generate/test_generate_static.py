"""The static decode step: same logits as the full forward and the eager step, every arch;
batching never changes a sample; no host read inside the step; the compiled step agrees."""

from __future__ import annotations

import pytest
import torch
from generate_archs import ARCHS, VOCAB, tiny_generator_model, tiny_model, tiny_tokenizer
from test_generate_cache import BOI, EOI, _full_logits, _sequences

from sparsefusion.generate import GenerationRequest, Generator
from sparsefusion.generate.engine import Decoder, sequence_inputs
from sparsefusion.models.inputs import ForwardContext
from sparsefusion.tokenizers.vocab import UnifiedVocab

TRANSFUSION = {"latent_channels": 4}  # the Transfusion setting's text path (patch layers exist)


def _static_logits(model, aux, seqs, prompt_lens, mode="static", vocab=VOCAB) -> list[torch.Tensor]:
    """Prefill ragged prompts (eager), then feed the rest one token per row with ``advance``."""
    dec = Decoder(model, vocab, batch=len(seqs), capacity=64, aux_routers=aux, step_mode=mode)
    prompts = [s[:n] for s, n in zip(seqs, prompt_lens, strict=True)]
    logits = dec.extend(prompts)
    out = [[logits[b, : len(p)]] for b, p in enumerate(prompts)]
    pos = list(prompt_lens)
    while any(p < len(s) for p, s in zip(pos, seqs, strict=True)):
        ids = [s[p] if p < len(s) else None for p, s in zip(pos, seqs, strict=True)]
        logits_BV = dec.advance(ids)
        for b, i in enumerate(ids):
            if i is not None:
                out[b].append(logits_BV[b : b + 1])
                pos[b] += 1
    assert [len(r.ids) for r in dec.rows] == [len(s) for s in seqs]
    return [torch.cat(parts) for parts in out]


@pytest.mark.parametrize("arch", [*ARCHS, "transfusion"])
def test_static_step_matches_full_forward(arch):
    model, aux = tiny_model("mot", **TRANSFUSION) if arch == "transfusion" else tiny_model(arch)
    seqs = _sequences()  # rows of different lengths, one with two documents (EOS mid-row)
    got = _static_logits(model, aux, seqs, prompt_lens=[7, 4, 2])
    for ids, logits in zip(seqs, got, strict=True):
        torch.testing.assert_close(logits, _full_logits(model, aux, ids), atol=1e-5, rtol=0)


SPEECH_VOCAB = UnifiedVocab({"text": 40, "image": 20, "speech": 12})  # speech ids 76..87


@pytest.mark.parametrize("arch", ["mot", "moma_mod"])
def test_static_step_with_speech_matches_full_forward(arch):
    """The Chameleon + speech setting: a third tower (MoT) or expert group (MoMa) chosen on the
    device from speech unit ids, inside BOA/EOA spans, rows of different lengths."""
    extra = {"modalities": ["text", "image", "speech"]}
    if arch == "moma_mod":
        extra["moe"] = {"experts": {"text": 2, "image": 2, "speech": 2}}
    model, aux = tiny_model(arch, **extra)
    g = torch.Generator().manual_seed(3)
    ids = lambda lo, hi, n: torch.randint(lo, hi, (n,), generator=g).tolist()  # noqa: E731
    boa, eoa = SPEECH_VOCAB.boa_id, SPEECH_VOCAB.eoa_id
    seqs = [
        [1, *ids(16, 56, 4), boa, *ids(76, 88, 7), eoa, *ids(16, 56, 3)],
        [1, boa, *ids(76, 88, 5), eoa, *ids(16, 56, 5), BOI, *ids(56, 76, 4), EOI],
        [1, *ids(16, 56, 8), boa, *ids(76, 88, 3)],
    ]
    assert (SPEECH_VOCAB.modality_of(torch.tensor(seqs[0])) == 2).sum() == 7
    got = _static_logits(model, aux, seqs, prompt_lens=[6, 3, 2], vocab=SPEECH_VOCAB)
    for row, logits in zip(seqs, got, strict=True):
        ctx = ForwardContext(routing_mode="causal", aux_routers=aux)
        full = model(sequence_inputs(model, SPEECH_VOCAB, row), ctx).logits_BTV[0]
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)


def test_static_mod_cache_keeps_only_the_selected_tokens():
    """A MoD layer's cache length grows by the tokens its aux router selected, as eager does."""
    model, aux = tiny_model("moma_mod")
    seqs = _sequences()
    lengths = {}
    for mode in ("eager", "static"):
        dec = Decoder(model, VOCAB, batch=3, capacity=64, aux_routers=aux, step_mode=mode)
        dec.extend([s[:3] for s in seqs])
        for t in range(3, 12):
            dec.advance([s[t] for s in seqs])
        lengths[mode] = (dec.cache.lengths(0), dec.cache.lengths(1))
    routed, full = lengths["static"]
    assert full == [12, 12, 12] and all(r < 12 for r in routed)
    assert lengths["static"] == lengths["eager"]


class _HostReads:
    """Counts the tensor methods that read a device value on the host."""

    NAMES = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))
        original_nonzero = torch.nonzero
        monkeypatch.setattr(torch, "nonzero", self._counting("torch.nonzero", original_nonzero))

    def _counting(self, name, original):
        def wrapper(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)

        return wrapper


@pytest.mark.parametrize("arch", ["mot", "moma_mod", "moe_tc", "hybrid"])
def test_static_step_reads_nothing_on_the_host(arch, monkeypatch):
    model, aux = tiny_model(arch)
    dec = Decoder(model, VOCAB, batch=3, capacity=32, aux_routers=aux, step_mode="static")
    dec.extend([s[:5] for s in _sequences()])
    step = dec.static_step
    token_B = torch.tensor([20, 60, VOCAB.eos_id])
    args = (token_B, torch.tensor([5, 5, 5]), torch.zeros(3, dtype=torch.long),
            torch.tensor([True, True, False]))  # fmt: skip
    reads = _HostReads(monkeypatch)
    step(*args)
    assert reads.calls == []
    dec.step_mode = "eager"  # the counter does see the eager step's host-built plan
    dec.advance([20, 60, None])
    assert reads.calls


def test_compiled_step_matches_eager_greedy():
    """One graph (fullgraph: no host read, no data-dependent shape) with towers, experts, MoD."""
    model, aux = tiny_model("moma_mod")
    seqs = _sequences()
    eager = _static_logits(model, aux, seqs, [7, 4, 2], mode="eager")
    compiled = _static_logits(model, aux, seqs, [7, 4, 2], mode="compiled")
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("arch", ["mot", "moma_mod"])
def test_a_sample_is_the_same_alone_and_inside_a_batch_of_8(tok, arch):
    model, aux = tiny_generator_model(tok, arch)
    gen = Generator(model, tok, aux, step="static")
    settings = [
        {"temperature": 1.0},
        {"temperature": 0.8, "top_k": 5},
        {"temperature": 1.2, "top_p": 0.7},
        {"temperature": 1.0, "repetition_penalty": 1.5},
        {"temperature": 0.0},
        {"temperature": 1.0, "mode": "interleaved"},
        {"temperature": 0.9, "mode": "text_to_image", "max_new_tokens": 6},
        {"temperature": 1.0, "top_k": 3, "top_p": 0.9, "repetition_penalty": 1.2},
    ]
    reqs = [
        GenerationRequest(
            prompt="The red circle" if k % 2 else "Two", seed=k, **{"max_new_tokens": 10, **s}
        )  # fmt: skip
        for k, s in enumerate(settings)
    ]
    together = [s.token_ids for s in gen.generate(reqs)]
    alone = [gen.generate([r])[0].token_ids for r in reqs]
    assert together == alone
    eager = Generator(model, tok, aux, step="eager")
    assert [s.token_ids for s in eager.generate(reqs)] == together  # one sampler, every step


def test_generator_reuses_its_static_decoders(tok):
    model, aux = tiny_generator_model(tok, "mot")
    gen = Generator(model, tok, aux, step="static")
    req = GenerationRequest(prompt="The red", temperature=0, max_new_tokens=5)
    first = gen.generate([req, req, req])
    assert len(gen._decoders) == 1  # batch 3 -> bucket 4
    again = gen.generate([req, req, req])
    assert len(gen._decoders) == 1
    assert [s.token_ids for s in first] == [s.token_ids for s in again]


def test_the_generator_keeps_at_most_max_decoders_least_recently_used_first(tok):
    """A server that sees many shapes keeps a bounded set of decoders (each holds a KV cache);
    a dropped shape is rebuilt on demand and samples the same."""
    model, aux = tiny_generator_model(tok, "mot")
    gen = Generator(model, tok, aux, step="static", max_decoders=2)
    req = GenerationRequest(prompt="The red", temperature=0, max_new_tokens=5)
    first = {n: [s.token_ids for s in gen.generate([req] * n)] for n in (1, 2)}
    gen.generate([req] * 3)  # a third bucket: batch 1's decoder (least recently used) goes
    assert [k[1] for k in gen._decoders] == [2, 4]
    gen.generate([req] * 2)  # used again: now the most recent
    gen.generate([req])
    assert [k[1] for k in gen._decoders] == [2, 1]
    assert [s.token_ids for s in gen.generate([req])] == first[1]
    with pytest.raises(ValueError, match="max_decoders"):
        Generator(model, tok, aux, max_decoders=0)


def test_the_cli_offers_exactly_the_decode_steps():
    import argparse

    from sparsefusion.cli.generate_cmd import add_step_arguments
    from sparsefusion.generate.static import DECODE_STEPS

    p = argparse.ArgumentParser()
    add_step_arguments(p)
    step = next(a for a in p._actions if a.dest == "step")
    assert tuple(step.choices) == DECODE_STEPS
