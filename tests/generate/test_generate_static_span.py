"""The static span step: image spans filled through it equal the eager fill (latents, and the
text that follows them) for every kind of model, patch layer and image process; a sample's image
is the same alone and in a batch of 8; no host read inside a pass; the compiled step agrees."""

from __future__ import annotations

import pytest
import torch
from generate_archs import tiny_model
from test_generate_diffusion import _latents, _tokenizer
from test_generate_static import _HostReads

from sparsefusion.generate import GenerationRequest, Generator
from sparsefusion.generate.engine import Decoder
from sparsefusion.generate.span_samplers import DiffusionSettings, DiffusionSpanSampler, OpenSpan
from sparsefusion.objectives.base import ObjectiveConfig, build_objective

UNET = {"patch_layers": "unet", "latent_size": 8, "unet_width": 8}
PROCESS = {"ddpm": "ddim", "flow": "euler"}  # image loss -> the sampler tested with it


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()  # 16-pixel images: 8x8x2 latents, 2x2 patches -> n = 16 of C = 8


def _model(tok, arch: str, patch_layers: str = "linear", seed: int = 0):
    extra = UNET if patch_layers == "unet" else {}
    return tiny_model(arch, seed, vocab_size=tok.vocab.padded_size(), latent_channels=2, **extra)


def _spans(tok, model, image_loss: str, steps: int = 3, sampler: str = "") -> DiffusionSpanSampler:
    schedule = build_objective(ObjectiveConfig(name="transfusion", image_loss=image_loss),
                               model.cfg).noise_schedule  # fmt: skip
    settings = DiffusionSettings(steps, sampler or PROCESS[image_loss])
    return DiffusionSpanSampler(tok, model.cfg.patch_size, schedule, settings)


def _batch(tok) -> tuple[list[list[int]], list[OpenSpan]]:
    """Rows of different prompt lengths: a guided span (row 0, partner row 2), a plain span
    after an earlier document (row 1), and a text row that does not fill (row 3)."""
    v = tok.vocab
    t = list(range(v.offset("text") + 5, v.offset("text") + 12))
    prompts = [
        [v.bos_id, *t[:4], v.boi_id],
        [v.bos_id, t[0], v.eos_id, v.bos_id, t[1], v.boi_id],
        [v.bos_id, v.boi_id],
        [v.bos_id, *t[2:7]],
    ]
    opened = [
        OpenSpan(0, torch.Generator().manual_seed(0), 0, guide=2, scale=2.5),
        OpenSpan(1, torch.Generator().manual_seed(1), 0),
    ]
    return prompts, opened


def _single(tok) -> tuple[list[list[int]], list[OpenSpan]]:
    v = tok.vocab
    return [[v.bos_id, v.offset("text") + 7, v.boi_id]], [
        OpenSpan(0, torch.Generator().manual_seed(3), 0)
    ]


def _fill_then_text(model, aux, tok, spans, mode: str, case, follow: int = 4):
    """Prefill, fill the opened spans in ``mode``, then feed EOI and ``follow`` greedy ids
    through the general step (the same for every mode: only the fill differs). ``case(tok)``
    gives the prompts and the spans (fresh random streams)."""
    prompts, opened = case(tok)
    dec = Decoder(model, tok.vocab, batch=len(prompts), capacity=48, aux_routers=aux,
                  step_mode=mode)  # fmt: skip
    text_BV = dec.last_logits(dec.extend(prompts), prompts)  # rows that do not fill go on
    latents = spans.fill(dec, opened)
    filled = {s.row for s in opened} | {s.guide for s in opened if s.guide is not None}
    eoi = [[tok.vocab.eoi_id] if b in filled else [] for b in range(len(prompts))]
    after_BV = dec.last_logits(dec.extend(eoi), eoi)
    logits_BV = torch.where(torch.tensor([bool(e) for e in eoi])[:, None], after_BV, text_BV)
    text: list[list[int]] = [[] for _ in prompts]
    for _ in range(follow):
        picked = [[i] for i in logits_BV.argmax(-1).tolist()]
        for row, i in zip(text, picked, strict=True):
            row += i
        logits_BV = dec.last_logits(dec.extend(picked), picked)
    return torch.stack(latents), text, dec.cache.lengths()


@pytest.mark.parametrize("image_loss", ["ddpm", "flow"])
@pytest.mark.parametrize("patch_layers", ["linear", "unet"])
@pytest.mark.parametrize("arch", ["dense", "mot", "moe_ec", "moma_mod"])
def test_static_span_fill_equals_the_eager_fill(tok, arch, patch_layers, image_loss):
    model, aux = _model(tok, arch, patch_layers)
    spans = _spans(tok, model, image_loss)
    for case in (_single, _batch):
        want_x, want_text, want_len = _fill_then_text(model, aux, tok, spans, "eager", case)
        got_x, got_text, got_len = _fill_then_text(model, aux, tok, spans, "static", case)
        torch.testing.assert_close(got_x, want_x, atol=1e-4, rtol=0)
        assert got_text == want_text and got_len == want_len


def test_a_sample_image_is_the_same_alone_and_inside_a_batch_of_8(tok):
    """Static step: the call decodes as one batch (8 samples + 4 guidance rows -> 16 rows)."""
    model, aux = _model(tok, "mot")
    spans = _spans(tok, model, "ddpm", sampler="ddpm")  # ancestral: each row draws its noise
    gen = Generator(model, tok, aux, span_sampler=spans, step="static")
    words = "a red square on blue".split()
    reqs = [
        GenerationRequest(prompt=" ".join(words[: 1 + k % 5]), mode="text_to_image", seed=k,
                          cfg_scale=2.0 if k % 2 else 1.0)
        for k in range(8)
    ]  # fmt: skip
    together = _latents(gen, reqs)
    assert {key[1] for key in gen._decoders} == {16}  # one batch, not one per sample
    alone = [_latents(gen, [r])[0] for r in reqs]
    for a, b in zip(together, alone, strict=True):
        assert len(a) == len(b) == 1
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0][0], together[2][0])  # different seeds, images


@pytest.mark.parametrize(("arch", "patch_layers"), [("moma_mod", "linear"), ("mot", "unet")])
def test_a_static_span_pass_reads_nothing_on_the_host(tok, arch, patch_layers, monkeypatch):
    model, aux = _model(tok, arch, patch_layers)
    prompts, opened = _batch(tok)
    dec = Decoder(model, tok.vocab, batch=4, capacity=48, aux_routers=aux, step_mode="static")
    dec.extend(prompts)
    n, pid = tok.patches_per_image(2), tok.patch_id
    ids = [[pid] * n if b < 3 else [] for b in range(4)]
    block = dec.span_block(ids, [[0] * len(i) for i in ids])
    step = dec.static_span_step(pid, n)
    patches_PC = torch.randn(4 * n, 8, generator=torch.Generator().manual_seed(0))
    reads = _HostReads(monkeypatch)
    step(block, patches_PC, torch.full((4 * n,), 500), commit=False)
    step(block, patches_PC, torch.zeros(4 * n, dtype=torch.long), commit=True)
    assert reads.calls == []
    dec.step_mode = "eager"  # the counter does see the eager fill's host-built plan
    _spans(tok, model, "ddpm", steps=1).fill(dec, opened)
    assert reads.calls


def test_the_compiled_span_step_agrees_with_the_static_one(tok):
    """One graph per commit flag (fullgraph: no host read, no data-dependent shape), with
    expert-choice layers routed by their auxiliary routers."""
    model, aux = _model(tok, "moe_ec")
    spans = _spans(tok, model, "flow", steps=2)
    want_x, want_text, want_len = _fill_then_text(model, aux, tok, spans, "static", _batch)
    got_x, got_text, got_len = _fill_then_text(model, aux, tok, spans, "compiled", _batch)
    torch.testing.assert_close(got_x, want_x, atol=1e-4, rtol=1e-4)
    assert got_text == want_text and got_len == want_len


def test_bench_generate_images_times_every_mode_and_static_matches_eager(capsys):
    from sparsefusion.cli.main import main

    assert main(["bench-generate", "--arch", "tf-mot-debug", "--images", "--batch", "2",
                 "--diffusion-steps", "2", "--modes", "eager", "static"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "| tf-mot-debug | 2 | eager |" in table and "| tf-mot-debug | 2 | static |" in table
    from sparsefusion.bench.span_fill import SpanBenchSettings, run_span_bench

    settings = SpanBenchSettings(
        arch="tf-mot-debug", batches=[1], steps=1, modes=["eager", "static"], cfg_scale=1.0
    )
    result = run_span_bench(settings)
    assert [r["mode"] for r in result["rows"]] == ["eager", "static"]
    assert result["rows"][1]["max_diff"] < 1e-4 and result["rows"][1]["images_s"] > 0
    with pytest.raises(ValueError, match="recompute"):
        SpanBenchSettings(modes=["recompute"])
