"""Score what a run generates: text -> image by ``fid_sf`` and ``clip_sf``, image -> text by CIDEr.

For a fixed, seeded list of held-out caption-image pairs (the validation split, which neither the
model nor the evaluator networks trained on), request ``i`` asks the generator
(:mod:`sparsefusion.generate`) for one sample with seed ``seed + i``:

- text -> image: the prompt is the caption; the generated images are compared with the held-out
  real images (``fid_sf``) and with their prompts (``clip_sf``);
- image -> text: the prompt is the image; the generated caption is scored against the reference
  caption (CIDEr-D).

Reference values on the same pairs put the numbers in scale: ``fid_sf_real`` (a second, disjoint
set of real images against the first), ``clip_sf_real`` (real images with their own captions),
``clip_sf_shuffled`` (real images with other images' captions), and ``fid_sf_tokenizer`` /
``clip_sf_tokenizer`` (the prompts' images after a round trip through the run's image
tokenizer: the best a sample can score through it).

Legend: N = images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from sparsefusion.eval.cider import cider_d
from sparsefusion.eval.evaluators import Evaluators
from sparsefusion.eval.pairs import Pair, images_to_tensor
from sparsefusion.eval.scores import clip_sf, fid_sf

T2I, I2T = "text_to_image", "image_to_text"


@dataclass(kw_only=True)
class GenerationSettings:
    """Sampling settings of the evaluation requests (``eval.*``)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    seed: int = 0


@dataclass
class GenerationResult:
    """Metrics, what was skipped and why, and the generated items (for the sample files)."""

    row: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    images: list[tuple[str, Image.Image | None]] = field(default_factory=list)
    captions: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[str, list] = field(default_factory=dict)
    pairs: list[Pair] = field(default_factory=list)


def reference_scores(ev: Evaluators, pairs: list[Pair], others: list[Pair]) -> dict[str, float]:
    """``fid_sf_real``, ``clip_sf_real`` and ``clip_sf_shuffled`` of the held-out pairs."""
    size = ev.features.image_size
    real = images_to_tensor([p.image for p in pairs], size)
    caps = [p.caption for p in pairs]
    out = {
        "clip_sf_real": clip_sf(ev, real, caps),
        "clip_sf_shuffled": clip_sf(ev, real, caps[1:] + caps[:1]) if len(caps) > 1 else 0.0,
    }
    if len(others) >= 2 and len(pairs) >= 2:
        out["fid_sf_real"] = fid_sf(
            ev.features, real, images_to_tensor([p.image for p in others], size)
        )
    return out


def tokenizer_ceiling(
    ev: Evaluators, tokenizer: Any, pairs: list[Pair], others: list[Pair]
) -> dict[str, float]:
    """``fid_sf_tokenizer`` and ``clip_sf_tokenizer``: the held-out images after a round trip
    through the run's image tokenizer (VAE latents or VQ codes and back), scored like samples.

    The best a model can reach through its tokenizer: a sample that is a perfect latent of the
    prompt's image still scores this, not ``fid_sf_real``. {} when the run has no image tokenizer.
    """
    image_tok = getattr(tokenizer, "vae", None) or getattr(tokenizer, "image", None)
    if image_tok is None or len(pairs) < 2 or len(others) < 2:
        return {}
    size = ev.features.image_size
    round_trip = image_tok.decode(image_tok.encode([p.image for p in pairs]))
    x_NCHW = images_to_tensor(round_trip, size)
    real = images_to_tensor([p.image for p in others], size)
    return {
        "fid_sf_tokenizer": fid_sf(ev.features, real, x_NCHW),
        "clip_sf_tokenizer": clip_sf(ev, x_NCHW, [p.caption for p in pairs]),
    }


def _request(mode: str, i: int, s: GenerationSettings, **kw):
    from sparsefusion.generate import GenerationRequest

    return GenerationRequest(
        mode=mode,
        num_samples=1,
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        cfg_scale=s.cfg_scale if mode == T2I else 1.0,  # guidance is for the image spans
        seed=s.seed + i,
        **kw,
    )


def _first(sample, modality: str):
    for seg in sample.segments:
        if seg.modality == modality:
            return seg.image if modality == "image" else seg.text
    return None


def text_to_image(gen, ev: Evaluators, pairs: list[Pair], s: GenerationSettings, res) -> None:
    """Generate an image per caption; ``fid_sf`` against the real images, ``clip_sf``."""
    reqs = [_request(T2I, i, s, prompt=p.caption) for i, p in enumerate(pairs)]
    for r in reqs:
        r.validate(gen)
    t0 = time.perf_counter()
    samples = gen.generate(reqs)
    res.row["t2i_seconds"] = round(time.perf_counter() - t0, 3)
    res.samples[T2I] = samples
    made = [(p, _first(x, "image")) for p, x in zip(pairs, samples, strict=True)]
    res.images = [(p.caption, im) for p, im in made]
    good = [(p, im) for p, im in made if im is not None]
    res.row["t2i_samples"] = len(pairs)
    res.row["t2i_without_image"] = len(pairs) - len(good)
    if len(good) < 2:
        res.skipped["fid_sf"] = res.skipped["clip_sf"] = (
            f"only {len(good)} of {len(pairs)} text -> image samples contain an image"
        )
        return
    size = ev.features.image_size
    fake = images_to_tensor([im for _, im in good], size)
    real = images_to_tensor([p.image for p in pairs], size)
    res.row["fid_sf"] = fid_sf(ev.features, real, fake)
    res.row["clip_sf"] = clip_sf(ev, fake, [p.caption for p, _ in good])


def image_to_text(gen, pairs: list[Pair], s: GenerationSettings, res) -> None:
    """Caption each held-out image; CIDEr-D against the reference captions."""
    reqs = [_request(I2T, i, s, prompt="", image=p.image) for i, p in enumerate(pairs)]
    for r in reqs:
        r.validate(gen)
    t0 = time.perf_counter()
    samples = gen.generate(reqs)
    res.row["i2t_seconds"] = round(time.perf_counter() - t0, 3)
    res.samples[I2T] = samples
    texts = [(_first(x, "text") or "").strip() for x in samples]
    score, per = cider_d(texts, [[p.caption] for p in pairs])
    res.row["cider"] = score
    res.row["i2t_samples"] = len(pairs)
    res.captions = [
        {"reference": p.caption, "generated": t, "cider": c}
        for p, t, c in zip(pairs, texts, per, strict=True)
    ]


def score_generation(
    gen, ev: Evaluators | None, pairs: list[Pair], s: GenerationSettings, why_no_ev: str = ""
) -> GenerationResult:
    """Both directions where the run can serve them; skipped metrics say why."""
    res = GenerationResult(pairs=list(pairs))
    modes = set(getattr(gen, "modes", ()))
    if T2I not in modes:
        res.skipped["fid_sf"] = res.skipped["clip_sf"] = (
            f"the run cannot serve {T2I} ({sorted(modes)})"
        )
    elif ev is None:
        res.skipped["fid_sf"] = res.skipped["clip_sf"] = why_no_ev
    else:
        text_to_image(gen, ev, pairs, s, res)
    if I2T not in modes:
        res.skipped["cider"] = f"the run cannot serve {I2T} ({sorted(modes)})"
    else:
        image_to_text(gen, pairs, s, res)
    return res
