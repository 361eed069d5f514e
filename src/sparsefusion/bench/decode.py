"""Decode speed: the decode step's modes side by side, and recomputing the whole prefix.

``sparsefusion bench-generate --arch mot`` builds the preset's model (random weights, the demo
vocabulary: 2048 text ids + 512 image codes; auxiliary routers for batch-routed sites), prefills
``batch`` prompts of ``prompt_len`` ids and times ``new_tokens`` greedy decode steps with every
mode asked for, at every batch size asked for, in one process:

- ``recompute``: one full causal-mode forward over the whole sequence per new token (a model
  without a cache);
- ``eager``: the general cached step (host-built inputs and routing plan per step);
- ``static``: the static-shape step (``generate/static.py``), not compiled;
- ``compiled``: the static step under ``torch.compile`` (its first call, the compile, is
  timed apart and reported as ``compile_s``).

Every mode must pick the same tokens as ``eager`` (``same_tokens``). The first decode step is a
warm-up and is not timed (it holds the compile). Prefill tokens/s is the eager prefill's.
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
MODES = ("recompute", "eager", "static", "compiled")


@dataclass(kw_only=True)
class DecodeBenchSettings:
    """What ``bench-generate`` measures.

    Attributes:
        batches: batch sizes B (each mode runs at each).
        modes: which of ``MODES`` to time; ``recompute`` runs at the smallest batch only.
    """

    arch: str = "mot"
    overrides: list[str] = field(default_factory=list)
    batches: list[int] = field(default_factory=lambda: [1])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    prompt_len: int = 64
    new_tokens: int = 64
    threads: int = 1
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.modes) - set(MODES))
        if unknown:
            raise ValueError(f"unknown decode modes {unknown}; choose from {list(MODES)}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batches}")
        if self.prompt_len < 1 or self.new_tokens < 2:
            raise ValueError("prompt_len must be >= 1 and new_tokens >= 2")


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
    """Time every mode at every batch size; returns the settings and one row per (B, mode)."""
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    model, aux, vocab = build_bench_model(settings)
    rows = []
    for B in settings.batches:
        prompts = _prompts(vocab, B, settings)
        timed = []
        for mode in settings.modes:
            if mode == "recompute" and B != min(settings.batches):
                continue
            row = _time_mode(model, aux, vocab, prompts, settings.new_tokens, mode)
            timed.append({"batch": B, "mode": mode, **row})
        ref = next((r["tokens"] for r in timed if r["mode"] == "eager"), None)
        for r in timed:
            tokens = r.pop("tokens")
            r["same_tokens"] = None if ref is None else tokens == ref
        rows += timed
    return {
        "arch": settings.arch,
        "dim": model.cfg.dim,
        "layers": model.cfg.num_layers,
        "prompt_len": settings.prompt_len,
        "new_tokens": settings.new_tokens,
        "threads": torch.get_num_threads(),
        "device": str(model.output.weight.device),
        "rows": _with_ratios(rows),
    }


def _prompts(vocab: UnifiedVocab, B: int, settings: DecodeBenchSettings) -> list[list[int]]:
    g = torch.Generator().manual_seed(settings.seed)
    lo = vocab.offset("text")
    body = torch.randint(lo, lo + DEMO_VOCAB["text"], (B, settings.prompt_len - 1), generator=g)
    return [[vocab.bos_id, *ids] for ids in body.tolist()]


def _time_mode(model, aux, vocab, prompts, steps: int, mode: str) -> dict[str, Any]:
    if mode == "recompute":
        return _recompute(model, aux, vocab, prompts, steps)
    B = len(prompts)
    dec = Decoder(model, vocab, batch=B, capacity=len(prompts[0]) + steps, aux_routers=aux,
                  step_mode=mode)  # fmt: skip
    t0 = time.perf_counter()
    logits_BV = dec.last_logits(dec.extend(prompts), prompts)
    ids = logits_BV.argmax(-1).tolist()
    prefill_s = time.perf_counter() - t0
    out: list[list[int]] = [[i] for i in ids]
    t0 = time.perf_counter()
    logits_BV = dec.advance(ids)  # warm-up (the compile, for "compiled")
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        ids = logits_BV.argmax(-1).tolist()
        for row, i in zip(out, ids, strict=True):
            row.append(i)
        logits_BV = dec.advance(ids)
    seconds = time.perf_counter() - t0
    n = steps - 1
    return {
        "tok_s": B * n / seconds,
        "ms_per_step": 1e3 * seconds / n,
        "prefill_tok_s": B * len(prompts[0]) / prefill_s,
        "compile_s": first_s if mode == "compiled" else 0.0,
        "tokens": out,
    }


def _recompute(model, aux, vocab, prompts, steps: int) -> dict[str, Any]:
    ctx = ForwardContext(routing_mode="causal", aux_routers=aux)
    seqs = [list(p) for p in prompts]
    ids = _full(model, vocab, seqs, ctx).argmax(-1).tolist()
    out: list[list[int]] = [[i] for i in ids]
    for seq, i in zip(seqs, ids, strict=True):
        seq.append(i)
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        ids = _full(model, vocab, seqs, ctx).argmax(-1).tolist()
        for row, seq, i in zip(out, seqs, ids, strict=True):
            row.append(i)
            seq.append(i)
    seconds = time.perf_counter() - t0
    n, B = steps - 1, len(prompts)
    return {"tok_s": B * n / seconds, "ms_per_step": 1e3 * seconds / n, "prefill_tok_s": None,
            "compile_s": 0.0, "tokens": out}  # fmt: skip


def _with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's tokens/s over eager's and over recompute's (same batch; recompute: B = 1)."""
    by = {(r["batch"], r["mode"]): r["tok_s"] for r in rows}
    smallest = min(r["batch"] for r in rows)
    for r in rows:
        eager = by.get((r["batch"], "eager"))
        rec = by.get((smallest, "recompute"))
        r["x_eager"] = None if eager is None else r["tok_s"] / eager
        r["x_recompute"] = None if rec is None or r["batch"] != smallest else r["tok_s"] / rec
    return rows


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


def markdown_table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table (what docs/benchmarks.md carries)."""
    lines = [
        "| arch | B | mode | tokens/s | ms/step | x eager | x recompute | prefill tok/s "
        "| compile s | same tokens |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in result["rows"]:
        lines.append(
            f"| {result['arch']} | {r['batch']} | {r['mode']} | {r['tok_s']:.0f} "
            f"| {r['ms_per_step']:.2f} | {num(r['x_eager'], '.2f')} "
            f"| {num(r['x_recompute'], '.1f')} | {num(r['prefill_tok_s'], '.0f')} "
            f"| {num(r['compile_s'] or None, '.1f')} | {num(r['same_tokens'], '')} |"
        )
    return "\n".join(lines)
