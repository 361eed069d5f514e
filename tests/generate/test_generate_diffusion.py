"""Diffusion span sampling: a tiny model overfit on one image-caption pair samples that image
(through the VAE), with and without guidance, far closer than a random-init model; cached ==
uncached; a batch of requests samples what each request samples alone."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from sparsefusion.data.documents import IMAGE, TEXT, Document, Segment
from sparsefusion.data.encoded import CaptionOrder
from sparsefusion.data.loader import PackedLoader
from sparsefusion.generate import GenerationRequest, Generator
from sparsefusion.generate.span_samplers import DiffusionSettings, DiffusionSpanSampler
from sparsefusion.models.transformer import ModelConfig
from sparsefusion.objectives.base import ObjectiveConfig, build_objective
from sparsefusion.objectives.forward import forward_loss
from sparsefusion.tokenizers.image_vae import ImageVAEConfig, VAEImageTokenizer
from sparsefusion.tokenizers.text_bpe import BPETextTokenizer
from sparsefusion.tokenizers.transfusion import TransfusionTokenizer
from sparsefusion.tokenizers.vocab import UnifiedVocab

pytest.importorskip("diffusers", reason="the transfusion extra is not installed")

CAPTION = "a red square on blue"


class _Source:
    def __init__(self, docs):
        self.docs = docs

    def __len__(self):
        return len(self.docs)

    def document(self, i):
        return self.docs[i]


def _tokenizer() -> TransfusionTokenizer:
    torch.manual_seed(0)
    text = BPETextTokenizer.train([CAPTION] * 10, 260)
    vae = VAEImageTokenizer(
        ImageVAEConfig(image_size=16, channels=[8, 8], norm_groups=4, latent_channels=2)
    ).eval()
    vocab = UnifiedVocab({"text": text.vocab_size, "image": 1})
    return TransfusionTokenizer(text, vae, vocab, patch_size=2)


def _image() -> Image.Image:
    im = Image.new("RGB", (16, 16), (20, 40, 200))
    im.paste((230, 30, 30), (3, 3, 11, 11))
    return im


def _model(tok: TransfusionTokenizer, seed: int = 0):
    cfg = ModelConfig(
        arch="mot", vocab_size=tok.vocab.padded_size(), dim=64, num_layers=2, num_heads=4,
        multiple_of=8, latent_channels=2, qk_norm=False, norm_placement="pre", max_seq_len=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = cfg.build()
    model.init_weights()
    return model


def _overfit(tok, model, steps: int = 250, image_loss: str = "ddpm", losses=None):
    pair = Document(segments=[Segment(TEXT, CAPTION), Segment(IMAGE, _image())])
    alone = Document(segments=[Segment(IMAGE, _image())])  # the unconditional branch (CFG)
    loader = PackedLoader(
        _Source([pair, alone]), tok, seq_len=40, batch_size=4, docs_per_chunk=2,
        caption_order=CaptionOrder(0, caption_first=1.0, caption_dropout=0.0),
    )  # fmt: skip
    obj = build_objective(
        ObjectiveConfig(name="transfusion", z_loss=0.0, image_loss=image_loss), model.cfg
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batch = loader.next_batch()
    torch.manual_seed(1)
    for _ in range(steps):
        loss = forward_loss(model, batch, obj).loss()
        if losses is not None:
            losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _generator(
    tok,
    model,
    settings: DiffusionSettings | None = None,
    image_loss: str = "ddpm",
    step: str = "auto",
) -> Generator:
    """The run's generator: diffusion spans on the objective's noise schedule."""
    cfg = ObjectiveConfig(name="transfusion", image_loss=image_loss)
    schedule = build_objective(cfg, model.cfg).noise_schedule
    spans = DiffusionSpanSampler(tok, model.cfg.patch_size, schedule, settings)
    return Generator(model, tok, span_sampler=spans, step=step)


def _latents(gen: Generator, reqs) -> list[list[torch.Tensor]]:
    """The images (latents) of every sample, in ``generate``'s order."""
    _, owners, result = gen.decode(reqs)
    return [result.images[row] for row in owners.values()]


def _sample_mse(
    tok, model, cfg_scale: float, sampler: str = "ddim", image_loss: str = "ddpm"
) -> float:
    """Latent MSE of a sampled image to the pair's image (both through the VAE encoder)."""
    gen = _generator(tok, model, DiffusionSettings(steps=20, sampler=sampler), image_loss)
    req = GenerationRequest(prompt=CAPTION, mode="text_to_image", cfg_scale=cfg_scale, seed=3)
    (sample,) = gen.generate([req])
    (image,) = sample.images
    assert image.size == (16, 16)  # decoded by the VAE
    # sample 3 of seed 0 draws from torch.Generator().manual_seed(3) (see row_generator)
    req = GenerationRequest(**{**req.__dict__, "seed": 0, "num_samples": 4})
    (latent,) = _latents(gen, [req])[3]
    target = tok.vae.encode([_image()])[0]
    return float((latent - target).pow(2).mean())


@pytest.fixture(scope="module")
def trained():
    tok = _tokenizer()
    return tok, _overfit(tok, _model(tok))


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_overfit_model_samples_its_image(trained, cfg_scale):
    tok, model = trained
    fitted = _sample_mse(tok, model, cfg_scale)
    random = _sample_mse(tok, _model(tok, seed=5), cfg_scale)
    target = tok.vae.encode([_image()])[0]
    noise = float((torch.randn(target.shape, generator=torch.Generator().manual_seed(0)) - target)
                  .pow(2).mean())  # fmt: skip
    assert fitted < 0.25 * random and fitted < 0.5 * noise, (fitted, random, noise)


@pytest.fixture(scope="module")
def trained_flow():
    tok, losses = _tokenizer(), []
    return tok, _overfit(tok, _model(tok), image_loss="flow", losses=losses), losses


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_flow_overfit_model_samples_its_image_with_the_auto_sampler(trained_flow, cfg_scale):
    tok, model, losses = trained_flow
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-10:]) < 0.2 * sum(losses[:10]), (losses[:10], losses[-10:])
    fitted = _sample_mse(tok, model, cfg_scale, sampler="auto", image_loss="flow")
    random = _sample_mse(tok, _model(tok, seed=5), cfg_scale, sampler="auto", image_loss="flow")
    assert fitted < 0.25 * random, (fitted, random)


def test_captioning_runs_and_emits_text(trained):
    tok, model = trained
    gen = _generator(tok, model)
    req = GenerationRequest(mode="image_to_text", image=_image(), max_new_tokens=8, temperature=0)
    (sample,) = gen.generate([req])
    assert sample.new_tokens >= 1 and not sample.images
    assert tok.vocab.boi_id not in sample.token_ids


def test_cached_image_pass_equals_the_full_forward_and_is_not_committed():
    from sparsefusion.generate import Decoder
    from sparsefusion.generate.span_samplers import patch_inputs
    from sparsefusion.models.inputs import ModelInputs, plan_for

    tok = _tokenizer()
    model = _model(tok).eval()
    prompt = [1, 20, 21, 22, tok.vocab.boi_id]
    n, pid = tok.patches_per_image(2), tok.patch_id
    patches = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    dec = Decoder(model, tok.vocab, batch=1, capacity=32)
    dec.step([prompt], commit=True)
    step = dict(span_ids=[[0] * n], **patch_inputs([0], [patches], n, 400))
    first = dec.step([[pid] * n], commit=False, **step).predictions["noise_PC"]
    again = dec.step([[pid] * n], commit=False, **step).predictions["noise_PC"]
    assert dec.cache.lengths() == [len(prompt)]  # the passes were not kept
    torch.testing.assert_close(first, again)
    ids = torch.tensor([prompt + [pid] * n])
    mods = tok.vocab.modality_of(ids)
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


def _batch_requests() -> list[GenerationRequest]:
    """Guided and plain images, text that may open an image, captioning (DDPM draws too)."""
    return [
        GenerationRequest(prompt=CAPTION, mode="text_to_image", cfg_scale=2.0, seed=1,
                          num_samples=2),
        GenerationRequest(prompt="a red", mode="text_to_image", seed=2),
        GenerationRequest(prompt="", mode="text", max_new_tokens=40, seed=3, num_samples=2),
        GenerationRequest(prompt="a red", mode="interleaved", max_new_tokens=40, seed=4),
        GenerationRequest(mode="image_to_text", image=_image(), max_new_tokens=8, seed=5),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("step", "batch_samples"), [("eager", False), ("eager", True), ("static", False)]
)
def test_batched_requests_equal_each_request_alone(trained, step, batch_samples):
    """The eager step honours ``batch_samples``; a static step always decodes one batch."""
    tok, model = trained
    settings = DiffusionSettings(steps=4, sampler="ddpm", batch_samples=batch_samples)
    gen = _generator(tok, model, settings, step=step)
    one_batch = batch_samples or step != "eager"
    reqs = _batch_requests()
    together = gen.generate(reqs)
    alone = [s for r in reqs for s in gen.generate([r])]
    assert [s.token_ids for s in together] == [s.token_ids for s in alone]
    got, want = _latents(gen, reqs), [x for r in reqs for x in _latents(gen, [r])]
    assert [len(x) for x in got] == [len(x) for x in want]
    opened = {s.token_ids.index(tok.vocab.boi_id) for s in together[3:6] if s.images}
    assert len(opened) >= 2  # rows opened their images at different steps (the rest waited)
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            if one_batch:  # one forward for all rows: equal up to the last bits of a float
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            else:  # each sample in a batch of its own: bit for bit
                assert torch.equal(a, b)
