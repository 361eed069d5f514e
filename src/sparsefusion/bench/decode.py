"""Decode speed: tokens/s with the KV cache against recomputing the whole prefix every token.

``sparsefusion bench-generate --arch mot`` builds the preset's model (random weights, the demo
vocabulary: 2048 text ids + 512 image codes; auxiliary routers for batch-routed sites), prefills
``batch`` prompts of ``prompt_len`` ids and times ``new_tokens`` greedy decode steps both ways.
The recompute path runs one full causal-mode forward over the whole sequence per new token
(what a model without a cache does). Both paths must pick the same tokens (``same_tokens``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsefusion.generate.engine import Decoder
from sparsefusion.models.inputs import ForwardContext, ModelInputs, plan_for
from sparsefusion.models.transformer import Transformer
from sparsefusion.nn.aux_router import AuxRouters
from sparsefusion.tokenizers.vocab import UnifiedVocab

DEMO_VOCAB = {"text": 2048, "image": 512}


@dataclass(kw_only=True)
class DecodeBenchSettings:
    """What ``bench-generate`` measures."""

    arch: str = "mot"
    overrides: list[str] = field(default_factory=list)
    batch: int = 1
    prompt_len: int = 64
    new_tokens: int = 64
    threads: int = 1
    device: str = "cpu"
    seed: int = 0


def build_bench_model(settings: DecodeBenchSettings):
    """The preset's model with the demo vocabulary (random init) and its aux routers."""
    from sparsefusion.runs.presets import resolve_config

    vocab = UnifiedVocab(dict(DEMO_VOCAB))
    cfg = resolve_config(
        settings.arch, [f"model.vocab_size={vocab.padded_size()}", *settings.overrides]
    ).model
    torch.manual_seed(settings.seed)
    model = Transformer(cfg)
    model.init_weights()
    aux = None
    if model.router_sites():
        aux = AuxRouters(cfg.dim, model.router_sites())
        aux.init_weights(std=0.5)
        aux.to(settings.device)
    return model.to(settings.device).eval(), aux, vocab


@torch.no_grad()
def run_decode_bench(settings: DecodeBenchSettings) -> dict[str, Any]:
    """Time cached and recomputed decoding; returns one row of numbers."""
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    model, aux, vocab = build_bench_model(settings)
    g = torch.Generator().manual_seed(settings.seed)
    lo = vocab.offset("text")
    prompts = [
        [
            vocab.bos_id,
            *torch.randint(lo, lo + 2048, (settings.prompt_len - 1,), generator=g).tolist(),
        ]
        for _ in range(settings.batch)
    ]
    cached, t_cached = _cached(model, aux, vocab, prompts, settings.new_tokens)
    recomputed, t_full = _recompute(model, aux, vocab, prompts, settings.new_tokens)
    n = settings.batch * settings.new_tokens
    return {
        "arch": settings.arch,
        "dim": model.cfg.dim,
        "layers": model.cfg.num_layers,
        "batch": settings.batch,
        "prompt_len": settings.prompt_len,
        "new_tokens": settings.new_tokens,
        "threads": torch.get_num_threads(),
        "cached_tok_s": n / t_cached,
        "recompute_tok_s": n / t_full,
        "speedup": t_full / t_cached,
        "same_tokens": cached == recomputed,
    }


def _cached(model, aux, vocab, prompts, steps):
    capacity = len(prompts[0]) + steps
    dec = Decoder(model, vocab, batch=len(prompts), capacity=capacity, aux_routers=aux)
    logits_BV = dec.last_logits(dec.extend(prompts), prompts)
    out: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    for _ in range(steps):
        ids = logits_BV.argmax(-1).tolist()
        for row, i in zip(out, ids, strict=True):
            row.append(i)
        step = [[i] for i in ids]
        logits_BV = dec.last_logits(dec.extend(step), step)
    return out, time.perf_counter() - t0


def _recompute(model, aux, vocab, prompts, steps):
    ctx = ForwardContext(routing_mode="causal", aux_routers=aux)
    seqs = [list(p) for p in prompts]
    logits_BV = _full(model, vocab, seqs, ctx)
    out: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    for _ in range(steps):
        ids = logits_BV.argmax(-1).tolist()
        for row, seq, i in zip(out, seqs, ids, strict=True):
            row.append(i)
            seq.append(i)
        logits_BV = _full(model, vocab, seqs, ctx)
    return out, time.perf_counter() - t0


def _full(model: Transformer, vocab: UnifiedVocab, seqs, ctx) -> torch.Tensor:
    """Last-position logits of one full forward over equal-length single-document rows."""
    tokens = torch.tensor(seqs, dtype=torch.long)
    B, T = tokens.shape
    modality = vocab.modality_of(tokens)
    inputs = ModelInputs(
        tokens_BT=tokens,
        position_BT=torch.arange(T).expand(B, T).contiguous(),
        document_BT=torch.zeros(B, T, dtype=torch.long),
        plan=plan_for(model.cfg.tower_of_modality, model.cfg.num_towers, modality),
        modality_BT=modality,
    )
    device = model.output.weight.device
    return model(inputs.to(device), ctx).logits_BTV[:, -1]
