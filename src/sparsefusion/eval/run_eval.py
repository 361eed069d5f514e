"""``sparsefusion eval RUN_DIR``: perplexity in both routing modes, and generation scored by the
project's evaluator networks (``fid_sf``, ``clip_sf``) and by CIDEr.

One JSON row per evaluation is appended to ``RUN_DIR/eval.jsonl`` (``step``, ``size``, the
metrics, ``skipped``: metric -> why); sample images, captions and a Markdown summary go to
``RUN_DIR/eval/step_<STEP>_<size>[_<setting>-<value>...]/`` (:func:`sample_folder`: the sampling
settings that differ from the defaults). The same seed gives the same numbers. A run without images
(or whose model cannot generate) evaluates what it has and names what it skipped.

:func:`evaluate_at_checkpoint` is the small version the trainer calls every
``run.eval_generate_every`` steps, after saving that step's checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sparsefusion.checkpoint.store import file_digest
from sparsefusion.data.documents import IMAGE
from sparsefusion.data.sources import build_source
from sparsefusion.eval.evaluators import EvaluatorConfig, EvaluatorError, load_or_train
from sparsefusion.eval.generation_eval import (
    GenerationResult,
    GenerationSettings,
    reference_scores,
    score_generation,
    tokenizer_ceiling,
)
from sparsefusion.eval.pairs import read_pairs
from sparsefusion.eval.perplexity import routing_perplexity
from sparsefusion.runs.config import TrainConfig
from sparsefusion.runs.data import data_for
from sparsefusion.runs.folder import aux_routers_path, load_model, run_config
from sparsefusion.runs.tokenizer import run_tokenizer

log = logging.getLogger("sparsefusion")
SIZES = ("full", "small")


@dataclass(kw_only=True)
class EvalConfig:
    """What ``sparsefusion eval`` measures (``eval.*`` overrides).

    Attributes:
        num_samples: held-out caption-image pairs prompted in each direction.
        small_num_samples: the same for the in-training evaluation (``run.eval_generate_every``).
        val_batches: validation batches for perplexity (0: the run's ``data.val_batches``).
        perplexity: measure batch/causal perplexity.
        generate: run the generation metrics.
        max_new_tokens, temperature, top_k, top_p, cfg_scale: sampling settings.
        diffusion_steps: denoising passes per image (continuous images; the paper uses 250).
        sampler: the image sampler of continuous images: ``auto`` (the run's image process's
            own: DDIM for ``ddpm``, Euler for ``flow``), ``ddim``, ``ddpm`` or ``euler``.
        seed: seed of request ``i`` is ``seed + i``.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        step: the decode step: ``auto`` (compiled for large batches), ``eager``, ``static``
            or ``compiled`` (see ``generate/static.py``).
        threads: CPU threads (0 keeps torch's default).
        samples: write sample images and captions beside the row.
        evaluator: how the evaluator networks are trained and cached.
    """

    num_samples: int = 256
    small_num_samples: int = 64
    val_batches: int = 0
    perplexity: bool = True
    generate: bool = True
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    diffusion_steps: int = 50
    sampler: str = "auto"
    seed: int = 0
    device: str = "auto"
    step: str = "auto"
    threads: int = 0
    samples: bool = True
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)

    def __post_init__(self) -> None:
        for name in ("num_samples", "small_num_samples", "max_new_tokens"):
            if getattr(self, name) < 2 and name != "max_new_tokens":
                raise ValueError(f"eval.{name} must be >= 2, got {getattr(self, name)}")
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        from sparsefusion.objectives.diffusion import SAMPLERS

        try:
            from sparsefusion.generate.static import DECODE_STEPS
        except ImportError:  # generation unavailable: the metrics that need it are skipped
            DECODE_STEPS = (self.step,)

        if self.sampler not in SAMPLERS:
            raise ValueError(f"eval.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.diffusion_steps < 1:
            raise ValueError(f"eval.diffusion_steps must be >= 1, got {self.diffusion_steps}")
        if self.step not in DECODE_STEPS:
            raise ValueError(f"eval.step must be one of {DECODE_STEPS}, got {self.step!r}")
        if self.val_batches < 0 or self.threads < 0 or self.top_k < 0:
            raise ValueError("eval.val_batches, eval.threads and eval.top_k must be >= 0")
        if not self.temperature > 0 or not 0 < self.top_p <= 1 or not self.cfg_scale > 0:
            raise ValueError(
                "eval.temperature and eval.cfg_scale must be > 0, eval.top_p in (0, 1]"
            )

    def sampling(self) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            cfg_scale=self.cfg_scale,
            seed=self.seed,
        )


def _device(name: str) -> torch.device:
    from sparsefusion.runtime.device import resolve_device

    return resolve_device(name)


def evaluate_run(
    run_dir: str | Path, cfg: EvalConfig, *, checkpoint: int | None = None, size: str = "full"
) -> tuple[dict[str, Any], Path]:
    """Evaluate one checkpoint of a run (newest by default); returns the row and its folder."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    run_dir = Path(run_dir)
    run_cfg = run_config(run_dir)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model, ckpt, state = load_model(run_dir, run_cfg, checkpoint, device)
    step = int(state["step"])
    row: dict[str, Any] = {"step": step, "size": size, "checkpoint": ckpt.name, "seed": cfg.seed}
    row["sampling"] = {  # what drew the samples, so rows of different settings stay apart
        **asdict(cfg.sampling()),
        "diffusion_steps": cfg.diffusion_steps,
        "sampler": cfg.sampler,
    }
    row.update(_counters(run_dir, state, step))
    if aux_routers_path(run_dir).is_file():  # the routers its causal numbers and samples used
        row["aux_routers"] = file_digest(aux_routers_path(run_dir))
    skipped: dict[str, str] = {}
    if cfg.perplexity:
        val = data_for(run_cfg, "val", run_tokenizer(run_dir, run_cfg), num_batches=cfg.val_batches)
        ppl, notes = routing_perplexity(run_dir, model, run_cfg, device, val)
        row.update(ppl)
        skipped.update({f"ppl/{k}": v for k, v in notes.items() if f"loss/{k}" not in ppl})
        row["notes"] = notes
    del model
    gen_res = GenerationResult()
    if cfg.generate:
        n = cfg.num_samples if size == "full" else cfg.small_num_samples
        gen_res = _generation(run_dir, run_cfg, cfg, step, n, device, row)
        skipped.update(gen_res.skipped)
        row.update(gen_res.row)
    else:
        skipped.update({k: "eval.generate=false" for k in GENERATION_METRICS})
    row["skipped"] = skipped
    row["eval_seconds"] = round(time.perf_counter() - t0, 2)
    out = run_dir / "eval" / sample_folder(step, size, cfg)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.samples:
        _write_samples(out, gen_res, gen_res.pairs)
    (out / "summary.md").write_text(summary_markdown(row, run_dir))
    with open(run_dir / "eval.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row, out


def _counters(run_dir: Path, state: dict[str, Any], step: int) -> dict[str, Any]:
    """FLOPs, tokens and ``elapsed_s`` from the checkpoint (older checkpoints have no
    ``elapsed_s``: then from the metrics row of ``step``, when it has one)."""
    out: dict[str, Any] = {k: state[k] for k in ("flops", "tokens", "elapsed_s") if k in state}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and "elapsed_s" not in out:
        for line in metrics.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("step") == step and r.get("split", "train") == "train" and "elapsed_s" in r:
                out["elapsed_s"] = r["elapsed_s"]
    return out


GENERATION_METRICS = ("fid_sf", "clip_sf", "cider")


def _skip_all(res: GenerationResult, why: str) -> GenerationResult:
    res.skipped.update({k: why for k in GENERATION_METRICS})
    return res


def _generation(run_dir, run_cfg: TrainConfig, cfg: EvalConfig, step, n, device, row):
    """Generation metrics of one checkpoint; ``row`` gains the evaluators and reference values."""
    res = GenerationResult()
    if IMAGE not in run_cfg.model.modalities:
        return _skip_all(res, "the run's corpus has no images")
    try:
        from sparsefusion.generate import DiffusionSettings, Generator
    except ImportError as e:
        return _skip_all(res, f"generation is not available in this version ({e})")
    from sparsefusion.objectives.diffusion import check_sampler

    check_sampler(run_cfg.objective, cfg.sampler)  # a sampler that cannot fit: the user's error
    pairs = read_pairs(build_source(run_cfg.data, seed=0, split="val"), 2 * n)
    if len(pairs) < 4:
        return _skip_all(res, f"only {len(pairs)} held-out caption-image pairs in the corpus")
    prompts = pairs[: min(n, len(pairs) // 2)]
    others = pairs[len(prompts) : 2 * len(prompts)]
    try:
        diffusion = DiffusionSettings(steps=cfg.diffusion_steps, sampler=cfg.sampler)
        gen = Generator.from_run(
            str(run_dir), checkpoint=step, device=str(device), diffusion=diffusion, step=cfg.step
        )
    except ValueError as e:  # e.g. a batch-routed model without auxiliary routers
        return _skip_all(res, f"the run cannot generate: {e}")
    ev, why = None, ""
    try:
        ev = _evaluators(run_cfg, cfg)
    except EvaluatorError as e:
        if cfg.evaluator.path:
            raise
        why = str(e)
    if ev is not None:
        row["evaluators"] = {"path": str(ev.path), "heldout": ev.manifest["heldout"]}
        row.update(reference_scores(ev, prompts, others))
        row.update(tokenizer_ceiling(ev, getattr(gen, "tokenizer", None), prompts, others))
    return score_generation(gen, ev, prompts, cfg.sampling(), why)


def _evaluators(run_cfg: TrainConfig, cfg: EvalConfig):
    data = run_cfg.data
    return load_or_train(
        cfg.evaluator,
        build_source(data, seed=0, split="train"),
        build_source(data, seed=0, split="val"),
        image_size=data.image_size,
        log=log.info,
    )


def sample_folder(step: int, size: str, cfg: EvalConfig) -> str:
    """``step_<STEP>_<size>``, then every sampling setting that is not the default as
    ``_<key><value>`` (e.g. ``step_00001200_full_cfg_scale-3.0_sampler-ddpm``), so evaluations of
    one checkpoint with other settings keep their own samples."""
    default = EvalConfig()
    keys = ("cfg_scale", "diffusion_steps", "sampler", "temperature", "top_k", "top_p",
            "max_new_tokens", "seed")  # fmt: skip
    parts = [f"step_{step:08d}_{size}"]
    for key in keys:
        value = getattr(cfg, key)
        if value != getattr(default, key):
            parts.append(f"{key}-{value}")
    return "_".join(parts)


def _write_samples(out: Path, res: GenerationResult, pairs: list) -> None:
    """``text_to_image.png``: rows of 8 held-out real images, each above its generated one."""
    shown = [(p.image, im) for p, (_, im) in zip(pairs, res.images, strict=False)][:16]
    if shown:
        side = 64
        cols, rows = min(8, len(shown)), 2 * ((len(shown) + 7) // 8)
        grid = Image.new("RGB", (side * cols, side * rows), "white")
        for i, (real, fake) in enumerate(shown):
            x, y = (i % 8) * side, (i // 8) * 2 * side
            grid.paste(real.convert("RGB").resize((side, side), Image.Resampling.NEAREST), (x, y))
            if fake is not None:
                fake = fake.convert("RGB").resize((side, side), Image.Resampling.NEAREST)
                grid.paste(fake, (x, y + side))
        grid.save(out / "text_to_image.png")
        with open(out / "text_to_image_prompts.txt", "w") as f:
            f.writelines(f"{i}: {cap}\n" for i, (cap, _) in enumerate(res.images[:16]))
    if res.captions:
        with open(out / "image_to_text.jsonl", "w") as f:
            f.writelines(json.dumps(c) + "\n" for c in res.captions)
    try:
        from sparsefusion.generate import write_samples
    except ImportError:
        return
    for mode, samples in res.samples.items():
        write_samples(samples[:8], str(out / mode))


def summary_markdown(row: dict[str, Any], run_dir: Path) -> str:
    """A short Markdown summary of one evaluation row."""
    lines = [f"# Evaluation of `{run_dir}` at step {row['step']} ({row['size']})", ""]
    metrics = [(k, v) for k, v in row.items() if isinstance(v, float) and not k.endswith("seconds")]
    lines += ["| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics if k not in ("flops", "elapsed_s")]
    if row.get("skipped"):
        lines += ["", "Skipped:", ""] + [f"- `{k}`: {v}" for k, v in row["skipped"].items()]
    skipped_text = set(row.get("skipped", {}).values())
    for k, v in row.get("notes", {}).items():
        if v not in skipped_text:
            lines.append(f"- note on {k}: {v}")
    ev = row.get("evaluators")
    if ev:
        acc = ", ".join(f"{k} {v:.3f}" for k, v in ev["heldout"].items())
        lines += ["", f"Evaluator networks (`{ev['path']}`), held-out: {acc}."]
    lines += [
        "",
        "`fid_sf`/`clip_sf` use networks trained on this corpus (not Inception/OpenAI CLIP); "
        "`fid_sf_real` and `clip_sf_real` are the same scores for real held-out images, "
        "`fid_sf_tokenizer` and `clip_sf_tokenizer` for them after the image tokenizer's "
        "round trip.",
        "",
    ]
    return "\n".join(lines)


def evaluate_at_checkpoint(run_dir: str | Path, model: Any, cfg: TrainConfig, step: int) -> dict:
    """The small evaluation of a training run at ``step`` (its checkpoint must be saved).

    Called by the trainer on rank 0 every ``run.eval_generate_every`` steps; appends a
    ``size: small`` row to ``eval.jsonl``. Perplexity is left to the trainer's validation rows;
    only the generation metrics run. ``model`` is unused (the generator loads the saved
    checkpoint, so training state cannot leak into sampling) and kept for a stable signature.
    The global RNG state is restored afterwards, so a run with the hook trains exactly as one
    without it (and resumes as if never stopped).
    """
    del model
    ecfg = replace(EvalConfig(seed=cfg.seed), perplexity=False, device=cfg.train.device)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):  # training's RNG stream stays as it was
        row, _ = evaluate_run(run_dir, ecfg, checkpoint=step, size="small")
    return row
