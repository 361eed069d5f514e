"""Sampling rules, the constraint state machine, batching and guidance."""

from __future__ import annotations

import pytest
import torch
from generate_archs import tiny_generator_model, tiny_tokenizer

from sparsefusion.generate import GenerationRequest, Generator
from sparsefusion.generate.constraints import RowConstraint, SpanRules
from sparsefusion.generate.sampling import SamplingParams, pick, process_logits
from sparsefusion.generate.span_samplers import Prompt


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def gen(tok):
    model, aux = tiny_generator_model(tok, "mot")
    return Generator(model, tok, aux)


def test_top_k_top_p_greedy_and_penalty():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    greedy = SamplingParams(temperature=0)
    assert pick(process_logits(logits, greedy), greedy, torch.Generator()) == 1
    k2 = process_logits(logits, SamplingParams(top_k=2))
    assert torch.isinf(k2[[0, 3]]).all() and torch.isfinite(k2[[1, 2]]).all()
    p = process_logits(logits, SamplingParams(top_p=0.5))  # the top token holds ~0.63
    assert torch.isfinite(p).sum() == 1 and torch.isfinite(p[1])
    pen = process_logits(logits, SamplingParams(repetition_penalty=2.0), history=[1, 3])
    assert pen[1] == 1.5 and pen[3] == 0.25 and pen[2] == 2.0
    allowed = torch.tensor([True, False, False, True])
    assert pick(process_logits(logits, greedy, allowed), greedy, torch.Generator()) == 0
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_state_machine_spans_and_room(tok):
    v = tok.vocab
    rules = SpanRules(v, 384, image_tokens=4)
    c = RowConstraint(rules, "interleaved", budget=7)
    assert c.allowed()[v.boi_id] and not c.allowed()[v.offset("image")]
    c.advance(v.boi_id)
    for _ in range(4):
        assert c.allowed()[v.offset("image") : v.offset("image") + 16].all()
        assert not c.allowed()[v.eoi_id] and not c.allowed()[v.eos_id]
        c.advance(v.offset("image"))
    assert c.allowed().nonzero().flatten().tolist() == [v.eoi_id]
    c.advance(v.eoi_id)
    assert c.state == "text" and not c.done
    tight = RowConstraint(rules, "interleaved", budget=5)  # BOI + 4 + EOI = 6 > 5
    assert not tight.allowed()[v.boi_id]
    with pytest.raises(ValueError, match="not allowed"):
        RowConstraint(rules, "text", budget=9).advance(v.boi_id)


def test_speech_span_ends_at_eoa_or_limit(tok):
    from sparsefusion.tokenizers.vocab import UnifiedVocab

    v = UnifiedVocab({"text": 300, "image": 16, "speech": 8})
    rules = SpanRules(v, 384, image_tokens=4, max_speech_units=3)
    c = RowConstraint(rules, "text_to_speech", budget=10)
    c.advance(v.boa_id, forced=True)
    unit = v.offset("speech")
    for _ in range(2):
        assert not c.allowed()[v.eoa_id]  # at least two units (one decodes to no samples)
        c.advance(unit)
    assert c.allowed()[v.eoa_id] and c.allowed()[unit]
    c.advance(unit)
    assert c.allowed().nonzero().flatten().tolist() == [v.eoa_id]
    c.advance(v.eoa_id)
    assert c.done


def _img_ids(tok):
    lo = tok.vocab.offset("image")
    return range(lo, lo + tok.image.codebook_size)


@pytest.mark.parametrize("seed", [0, 1])
def test_text_to_image_always_yields_one_full_span(gen, tok, seed):
    L = tok.image.tokens_per_image
    req = GenerationRequest(
        prompt="The red circle",
        mode="text_to_image",
        seed=seed,
        num_samples=3,
        max_new_tokens=L + 2,
    )
    for s in gen.generate([req]):
        ids = s.token_ids
        assert ids[0] == tok.vocab.boi_id and ids[-1] == tok.vocab.eoi_id and len(ids) == L + 2
        assert all(i in _img_ids(tok) for i in ids[1:-1])
        assert [seg.modality for seg in s.segments] == ["image"]
        assert s.segments[0].image.size == (8, 8)


def test_no_image_code_outside_a_span(tok):
    vocab, img = tok.vocab, set(_img_ids(tok))
    model, _ = tiny_generator_model(tok, "mot")
    bias = torch.zeros(model.cfg.vocab_size)
    bias[list(img)] = 12.0  # the model "wants" image codes everywhere; the mask must say no
    bias[vocab.boi_id] = 4.0
    model.output.register_forward_hook(lambda mod, args, out: out + bias)
    gen = Generator(model, tok)
    reqs = [
        GenerationRequest(
            prompt="A green",
            mode="interleaved",
            num_samples=4,
            seed=3,
            max_new_tokens=40,
            temperature=1.5,
        ),
        GenerationRequest(prompt="A green", mode="text", num_samples=2, max_new_tokens=20),
    ]
    spans = 0
    for s in gen.generate(reqs):
        inside = False
        for i in s.token_ids:
            if i == vocab.boi_id:
                inside, n, spans = True, 0, spans + 1
            elif i == vocab.eoi_id:
                assert inside and n == tok.image.tokens_per_image
                inside = False
            elif inside:
                assert i in img
                n += 1
            else:
                assert i not in img
        assert not inside
        if s.mode == "text":
            assert vocab.boi_id not in s.token_ids
    assert spans > 0  # the interleaved samples did open spans (so the check ran inside them)


def test_batched_generation_equals_each_prompt_alone(tok):
    for arch in ("mot", "moma_mod"):
        model, aux = tiny_generator_model(tok, arch)
        gen = Generator(model, tok, aux)
        reqs = [
            GenerationRequest(prompt="The red circle is", temperature=0, max_new_tokens=12),
            GenerationRequest(prompt="Two", temperature=0, max_new_tokens=7, mode="interleaved"),
            GenerationRequest(prompt="A", temperature=0, mode="text_to_image", max_new_tokens=6),
        ]
        together = [s.token_ids for s in gen.generate(reqs)]
        alone = [gen.generate([r])[0].token_ids for r in reqs]
        assert together == alone


def test_cfg_scale_one_is_plain_sampling_and_larger_scales_change_it(tok):
    from sparsefusion.generate.decode import decode
    from sparsefusion.generate.engine import Decoder

    model, _ = tiny_generator_model(tok, "mot", seed=2)
    gen = Generator(model, tok)
    req = GenerationRequest(
        prompt="The red circle", mode="text_to_image", seed=5, num_samples=4, max_new_tokens=6
    )
    plain = [s.token_ids for s in gen.generate([req])]

    def guided(scale: float):
        prompts = [gen.encode_prompt(req)]
        rows = gen._rows([GenerationRequest(**{**req.__dict__, "cfg_scale": 2.0})], prompts)[0]
        for r in rows:
            r.scale = scale
        dec = Decoder(model, tok.vocab, batch=len(rows), capacity=32)
        new = decode(dec, rows, gen.spans).new_ids
        return [new[i] for i in range(0, len(rows), 2)]

    two = GenerationRequest(**{**req.__dict__, "cfg_scale": 2.0})
    rows = gen._rows([two], [Prompt([1, 20])])[0]
    uncond = rows[1]  # the unconditional partner: a document that opens with BOI
    assert uncond.follower and rows[0].guide == 1
    assert uncond.prompt + uncond.opening == [tok.vocab.bos_id, tok.vocab.boi_id]
    assert guided(1.0) == plain
    assert guided(3.0) != plain
    big = GenerationRequest(**{**req.__dict__, "cfg_scale": 3.0})
    assert [s.token_ids for s in gen.generate([big])] == guided(3.0)


def test_text_only_model_serves_no_image_modes(tok):
    model, _ = tiny_generator_model(tok, "mot", modalities=["text"])
    gen = Generator(model, tok)
    assert gen.modes == ["text", "interleaved"]
    with pytest.raises(ValueError, match="text_to_image.*no image modality"):
        GenerationRequest(prompt="x", mode="text_to_image").validate(gen)
    s = gen.generate([GenerationRequest(prompt="A", mode="interleaved", max_new_tokens=30)])[0]
    assert tok.vocab.boi_id not in s.token_ids


def test_stop_ids_and_max_new_tokens_end_a_sample(gen):
    free = gen.generate([GenerationRequest(prompt="The red", temperature=0, max_new_tokens=9)])[0]
    assert free.new_tokens == 9 or free.token_ids[-1] == gen.tokenizer.vocab.eos_id
    stop = free.token_ids[2]
    req = GenerationRequest(prompt="The red", temperature=0, max_new_tokens=9, stop_ids=(stop,))
    stopped = gen.generate([req])[0].token_ids
    assert stopped == free.token_ids[: free.token_ids.index(stop) + 1]
