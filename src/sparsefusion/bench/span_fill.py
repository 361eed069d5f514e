"""Image span speed: a Transfusion model fills image spans, eager vs static vs compiled.

``sparsefusion bench-generate --arch tf-mot --images`` builds the preset's model (random weights,
a 2048-id text vocabulary and the patch id; auxiliary routers for batch-routed sites; the latent
of the preset's VAE: 8x8x4 with 2x2 patches at the demo size, n = 16 patches per image),
prefills ``batch`` prompts of ``prompt_len`` ids ending in BOI (with a BOI-only guidance partner
per image unless the guidance scale is 1) and times one whole image span fill per mode, at every
batch size asked for, in one process: ``steps`` denoising passes and the committing pass, through
the span sampler of the preset's objective (``DiffusionSpanSampler.fill``: the same loop in
every mode, only the model call differs):

- ``eager``: :meth:`Decoder.step` per pass (the filling rows' ragged inputs built on the host);
- ``static``: the static span step (``generate/static_span.py``), not compiled;
- ``compiled``: that step under ``torch.compile``; ``compile_s`` is its compile time (both
  graphs: the denoising passes and the committing pass), measured in a one-pass warm-up fill
  that every mode runs and that is not timed.

Every mode's latents are compared with eager's (``max_diff``: the largest absolute difference).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsefusion.generate.engine import Decoder
from sparsefusion.generate.span_samplers import DiffusionSettings, DiffusionSpanSampler, OpenSpan
from sparsefusion.models.transformer import Transformer
from sparsefusion.nn.aux_router import AuxRouters
from sparsefusion.objectives.base import build_objective
from sparsefusion.tokenizers.vocab import UnifiedVocab

SPAN_VOCAB = {"text": 2048, "image": 1}  # a Transfusion vocabulary: text ids and the patch id
SPAN_MODES = ("eager", "static", "compiled")


@dataclass(kw_only=True)
class SpanBenchSettings:
    """What ``bench-generate --images`` measures.

    Attributes:
        arch: a Transfusion preset (its objective has a noise schedule), e.g. ``tf-mot``.
        overrides: dotted overrides of the preset (``model.*``, ``objective.image_loss=flow``).
        batches: images per fill B (each mode runs at each; guidance adds B partner rows).
        modes: which of ``SPAN_MODES`` to time.
        steps: denoising passes per image.
        prompt_len: ids of each prompt (BOS, text, BOI).
        cfg_scale: guidance scale (1: no partner rows).
    """

    arch: str = "tf-mot"
    overrides: list[str] = field(default_factory=list)
    batches: list[int] = field(default_factory=lambda: [1, 8])
    modes: list[str] = field(default_factory=lambda: list(SPAN_MODES))
    steps: int = 50
    prompt_len: int = 16
    cfg_scale: float = 3.0
    threads: int = 1
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.modes) - set(SPAN_MODES))
        if unknown:
            raise ValueError(f"image span fills time the modes {list(SPAN_MODES)}, not {unknown}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batches}")
        if self.steps < 1 or self.prompt_len < 2:
            raise ValueError("steps must be >= 1 and prompt_len >= 2 (BOS ... BOI)")


@dataclass(frozen=True)
class BenchLatents:
    """What a span sampler reads of a latent tokenizer (the fill needs no VAE, only its shape).

    Attributes:
        vocab: text ids and the patch id.
        latent_shape: (Z, h, w) of one image's latent.
    """

    vocab: UnifiedVocab
    latent_shape: tuple[int, int, int]

    @property
    def patch_id(self) -> int:
        return self.vocab.offset("image")

    def patches_per_image(self, patch_size: int) -> int:
        _, h, w = self.latent_shape
        return (h // patch_size) * (w // patch_size)


def build_span_bench(settings: SpanBenchSettings):
    """The preset's model sized to its VAE's latent (random init), aux routers, span sampler."""
    from sparsefusion.runs.presets import resolve_config

    vocab = UnifiedVocab(dict(SPAN_VOCAB))
    cfg = resolve_config(
        settings.arch, [f"model.vocab_size={vocab.padded_size()}", *settings.overrides]
    )
    vae = cfg.tokenizer.vae
    side = vae.latent_side
    model_cfg = dataclasses.replace(
        cfg.model,
        latent_channels=vae.latent_channels,
        latent_size=side if cfg.model.patch_layers == "unet" else cfg.model.latent_size,
    )
    objective = build_objective(cfg.objective, model_cfg)
    if objective.noise_schedule is None:
        raise ValueError(f"--images needs a Transfusion preset (tf-mot, ...); {settings.arch} "
                         "has no image noise schedule")  # fmt: skip
    torch.manual_seed(settings.seed)
    model = Transformer(model_cfg)
    model.init_weights()
    aux = None
    if model.router_sites():
        aux = AuxRouters(model_cfg.dim, model.router_sites())
        aux.init_weights(std=0.5)
        aux.to(settings.device)
    latents = BenchLatents(vocab, (vae.latent_channels, side, side))
    spans = DiffusionSpanSampler(
        latents, model_cfg.patch_size, objective.noise_schedule, DiffusionSettings(settings.steps)
    )
    return model.to(settings.device).eval(), aux, spans


@torch.no_grad()
def run_span_bench(settings: SpanBenchSettings) -> dict[str, Any]:
    """Time one image span fill per mode at every batch size; one row per (B, mode)."""
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    model, aux, spans = build_span_bench(settings)
    rows = []
    for B in settings.batches:
        timed = [
            {"batch": B, "mode": mode, **_time_fill(model, aux, spans, B, mode, settings)}
            for mode in settings.modes
        ]
        ref = next((r["latents"] for r in timed if r["mode"] == "eager"), None)
        for r in timed:
            x = r.pop("latents")
            r["max_diff"] = None if ref is None else float((x - ref).abs().max())
        rows += timed
    return {
        "arch": settings.arch,
        "dim": model.cfg.dim,
        "layers": model.cfg.num_layers,
        "patch_layers": model.cfg.patch_layers,
        "patches_per_image": spans.image_tokens,
        "steps": settings.steps,
        "sampler": spans.sampler,
        "cfg_scale": settings.cfg_scale,
        "prompt_len": settings.prompt_len,
        "threads": torch.get_num_threads(),
        "device": str(model.output.weight.device),
        "rows": rows,
    }


def _time_fill(model, aux, spans: DiffusionSpanSampler, B: int, mode: str, settings):
    prompts, opened = _requests(spans, B, settings)
    capacity = settings.prompt_len + spans.image_tokens + 1
    dec = Decoder(model, spans.tokenizer.vocab, batch=len(prompts), capacity=capacity,
                  aux_routers=aux, step_mode=mode)  # fmt: skip
    one_pass = dataclasses.replace(spans.settings, steps=1)
    warm = DiffusionSpanSampler(spans.tokenizer, spans.k, spans.schedule, one_pass)
    _prefill(dec, prompts)
    warm.fill(dec, opened(settings.seed + 1))  # not timed: the compile (both graphs), if any
    _prefill(dec, prompts)
    spans_B = opened(settings.seed)
    t0 = time.perf_counter()
    latents = spans.fill(dec, spans_B)
    seconds = time.perf_counter() - t0
    compile_s = 0.0
    if mode == "compiled":
        compile_s = dec.static_span_step(
            spans.tokenizer.patch_id, spans.image_tokens
        ).compile_seconds
    return {
        "images_s": B / seconds,
        "ms_per_pass": 1e3 * seconds / (settings.steps + 1),  # the committing pass counts
        "fill_s": seconds,
        "compile_s": compile_s,
        "latents": torch.stack(latents),
    }


def _prefill(dec: Decoder, prompts: list[list[int]]) -> None:
    dec.reset()
    dec.extend(prompts)


def _requests(spans: DiffusionSpanSampler, B: int, settings: SpanBenchSettings):
    """B prompts (BOS, random text, BOI), their guidance partners, and the spans' opener."""
    vocab = spans.tokenizer.vocab
    g = torch.Generator().manual_seed(settings.seed)
    lo = vocab.offset("text")
    body = torch.randint(lo, lo + SPAN_VOCAB["text"], (B, settings.prompt_len - 2), generator=g)
    prompts = [[vocab.bos_id, *ids, vocab.boi_id] for ids in body.tolist()]
    guided = settings.cfg_scale != 1.0
    if guided:
        prompts += [[vocab.bos_id, vocab.boi_id] for _ in range(B)]

    def opened(seed: int) -> list[OpenSpan]:
        return [
            OpenSpan(b, torch.Generator().manual_seed(seed * 1000 + b), span=0,
                     guide=B + b if guided else None, scale=settings.cfg_scale)
            for b in range(B)
        ]  # fmt: skip

    return prompts, opened


def span_markdown_table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table (what docs/benchmarks.md carries)."""
    lines = [
        "| arch | images B | mode | images/s | ms/pass | fill s | compile s | max diff |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    arch = result["arch"] + (" (unet)" if result["patch_layers"] == "unet" else "")
    for r in result["rows"]:
        diff = "" if r["max_diff"] is None else f"{r['max_diff']:.1e}"
        compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] else ""
        lines.append(
            f"| {arch} | {r['batch']} | {r['mode']} | {r['images_s']:.2f} "
            f"| {r['ms_per_pass']:.2f} | {r['fill_s']:.2f} | {compile_s} | {diff} |"
        )
    return "\n".join(lines)
