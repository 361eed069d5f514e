"""``sparsefusion generate RUN_DIR`` and ``sparsefusion bench-generate``.

    sparsefusion generate runs/default --prompt "a red circle" --mode text_to_image --num 4 --out s/
    sparsefusion generate runs/default --image cat.png --mode image_to_text --out s/
    sparsefusion generate runs/default --prompts prompts.jsonl --out s/
    sparsefusion generate runs/default --demo --out s/   # a caption, an image, a continuation
    sparsefusion bench-generate --arch mot --prompt-len 64 --new-tokens 128
    sparsefusion bench-generate --arch tf-mot --images --batch 1 8   # image span fills

The output folder holds every sample's text, PNG images, WAV files, ``tokens.json`` and
``index.html`` (open it in a browser).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from sparsefusion.generate.request import MAX_NUM_SAMPLES, MAX_TOTAL_SAMPLES


def cmd_generate(args: argparse.Namespace) -> int:
    from sparsefusion.generate import GenerationRequest, Generator, write_samples
    from sparsefusion.generate.prompts import read_prompts

    if sum(bool(x) for x in (args.prompt is not None, args.prompts, args.demo)) > 1:
        raise ValueError("give one of --prompt TEXT, --prompts FILE.jsonl and --demo")
    if args.prompt is None and not (args.prompts or args.image or args.audio or args.demo):
        raise ValueError("give --prompt TEXT, --prompts FILE.jsonl, --image/--audio PATH or --demo")
    base = GenerationRequest(
        prompt=args.prompt or "",
        mode=args.mode or _default_mode(args),
        image=args.image,
        audio=args.audio,
        num_samples=args.num,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        cfg_scale=args.cfg,
        seed=args.seed,
        stop_ids=tuple(args.stop_id),
        max_num_samples=args.max_samples,
    )
    diffusion = _check_early(base, args)
    gen = Generator.from_run(
        args.run_dir,
        checkpoint=args.checkpoint,
        device=args.device,
        diffusion=diffusion,
        step="compiled" if args.compile else args.step,
    )
    if args.demo:
        from sparsefusion.generate.demo import demo_requests

        requests = demo_requests(gen.run_config, base, gen.modes, per_kind=args.num)
        requests = [  # one sample per document, each with its own random stream
            dataclasses.replace(r, num_samples=1, seed=base.seed + k)
            for k, r in enumerate(requests)
        ]
    elif args.prompts:
        size = gen.tokenizer.image.cfg.image_size
        requests = read_prompts(args.prompts, base, size)
        if args.mode:  # an explicit --mode wins over the file's defaults (not its own "mode")
            requests = [_with_mode(r, args.mode) for r in requests]
    else:
        requests = [base]
    total = sum(r.num_samples for r in requests if isinstance(r.num_samples, int))
    if total > args.max_total_samples:
        raise ValueError(
            f"{len(requests)} request(s) ask for {total} samples > --max-total-samples="
            f"{args.max_total_samples} (they decode as one batch)"
        )
    samples = gen.generate(requests)
    out = write_samples(samples, args.out)
    for k, s in enumerate(samples):
        kinds = ", ".join(seg.modality for seg in s.segments) or "nothing"
        text = s.text.replace("\n", " ")
        print(f"sample_{k:03d} [{s.mode}] {s.new_tokens} tokens ({kinds}): {text[:100]}")
    tok_s = sum(s.new_tokens for s in samples) / max(1e-9, samples[0].seconds) if samples else 0
    print(f"{len(samples)} samples, {tok_s:.1f} new tokens/s; open {out / 'index.html'}")
    return 0


def check_out_folder(path: str | Path, flag: str) -> None:
    """Refuse, before any work, an output folder that cannot be created or written.

    Raises:
        ValueError: ``path`` or one of its parents exists and is not a folder, or the nearest
            existing folder is not writable.
    """
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "is" if p == path else f"has {p}, which is"
                raise ValueError(f"{flag} {path} {what} an existing file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ValueError(f"{flag} {path}: {p} is not writable")
            return


def check_out_file(path: str | Path, flag: str) -> None:
    """Refuse, before any work, an output file path that is a folder or in no writable folder."""
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a folder, not a file")
    check_out_folder(Path(path).parent, flag)


def _default_mode(args: argparse.Namespace) -> str:
    return "image_to_text" if args.image else "speech_to_text" if args.audio else "text"


def _with_mode(req, mode: str):
    return req if "mode" in req.document.meta else dataclasses.replace(req, mode=mode)


def _check_early(base, args: argparse.Namespace):
    """Option errors before the run is loaded (the rest: ``validate``, before model work).

    Returns the diffusion settings (used by runs that sample images by diffusion).
    """
    from sparsefusion.generate.constraints import MODES
    from sparsefusion.generate.sampling import sampling_problems
    from sparsefusion.generate.span_samplers import DiffusionSettings

    if base.mode not in MODES:
        raise ValueError(f"--mode must be one of {list(MODES)}, got {base.mode!r}")
    problems = sampling_problems(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    if problems:
        raise ValueError(f"--{problems[0].replace('_', '-')}")
    if args.num < 1 or args.max_new_tokens < 1:
        raise ValueError("--num and --max-new-tokens must be >= 1")
    if args.max_samples < 1 or args.max_total_samples < 1:
        raise ValueError("--max-samples and --max-total-samples must be >= 1")
    if args.num > min(args.max_samples, args.max_total_samples):
        bound = "--max-samples" if args.max_samples <= args.max_total_samples else (
            "--max-total-samples")  # fmt: skip
        raise ValueError(
            f"--num {args.num} exceeds {bound}={min(args.max_samples, args.max_total_samples)}"
        )
    if args.cfg <= 0:
        raise ValueError(f"--cfg must be > 0 (1 = no guidance), got {args.cfg}")
    for flag, value in (("--image", args.image), ("--audio", args.audio)):
        if value and not Path(value).is_file():
            raise ValueError(f"{flag}: {value} does not exist")
    if args.image:  # the datasets' decoder and limits, before the model is loaded
        from sparsefusion.data.images import read_image

        read_image(args.image, f"--image {args.image}", None)
    check_out_folder(args.out, "--out")
    if args.prompts and not Path(args.prompts).is_file():
        raise ValueError(f"--prompts: {args.prompts} is not a file")
    from sparsefusion.objectives.diffusion import check_sampler
    from sparsefusion.runs.folder import is_run_folder, run_config

    if not is_run_folder(args.run_dir):
        raise ValueError(f"{args.run_dir} is not a run folder (no config.yaml)")
    settings = DiffusionSettings(steps=args.diffusion_steps, sampler=args.sampler)
    try:
        check_sampler(run_config(args.run_dir).objective, args.sampler)
    except ValueError as e:
        raise ValueError(f"--sampler: {e}") from None
    return settings


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from sparsefusion.bench.decode import (
        MODES,
        DecodeBenchSettings,
        markdown_table,
        run_decode_bench,
    )

    if args.out:
        check_out_file(args.out, "--out")
    if args.images:
        return _bench_images(args)
    settings = DecodeBenchSettings(
        arch=args.arch,
        overrides=args.overrides,
        batches=args.batch,
        modes=args.modes or list(MODES),
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        threads=args.threads,
        device=args.device,
    )
    return _report(run_decode_bench(settings), markdown_table, args.out)


def _bench_images(args: argparse.Namespace) -> int:
    """``bench-generate --images``: image span fills of a Transfusion preset, per mode."""
    from sparsefusion.bench.span_fill import (
        SPAN_MODES,
        SpanBenchSettings,
        run_span_bench,
        span_markdown_table,
    )

    settings = SpanBenchSettings(
        arch=args.arch,
        overrides=args.overrides,
        batches=args.batch,
        modes=args.modes or list(SPAN_MODES),
        steps=args.diffusion_steps,
        prompt_len=args.prompt_len,
        cfg_scale=args.cfg_scale,
        threads=args.threads,
        device=args.device,
    )
    return _report(run_span_bench(settings), span_markdown_table, args.out)


def _report(result: dict, table, out: str) -> int:
    """Print a bench result as a Markdown table and write it as JSON to ``out`` (if given)."""
    print(table(result))
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    return 0


def add_step_arguments(p: argparse.ArgumentParser) -> None:
    """``--step`` and ``--compile``: how the decode loop runs one token per row."""
    p.add_argument(
        "--step",
        default="auto",
        choices=["auto", "eager", "static", "compiled"],  # generate.static.DECODE_STEPS
        help="decode step: static shapes (static), compiled once per batch bucket (compiled), "
        "the general step (eager); auto compiles batches of 4096+ new tokens",
    )
    p.add_argument("--compile", action="store_true", help="the same as --step compiled")


def add_commands(sub) -> None:
    """Register ``generate`` and ``bench-generate``."""
    p = sub.add_parser(
        "generate",
        help="sample text, images and speech from a trained run (HTML page + files)",
        usage="sparsefusion generate RUN_DIR (--prompt TEXT | --prompts FILE.jsonl | --image P)"
        " [options] --out DIR",
    )
    p.add_argument("run_dir", help="the run folder")
    p.add_argument("--prompt", default=None, help="the text prompt")
    p.add_argument("--prompts", default=None, help="a JSONL file of prompt documents")
    p.add_argument(
        "--mode",
        default=None,
        help="text | text_to_image | image_to_text | "
        "text_to_speech | speech_to_text | interleaved (default: text, or "
        "image_to_text with --image)",
    )
    p.add_argument("--image", default=None, help="image file to caption (image_to_text)")
    p.add_argument("--audio", default=None, help="WAV file to transcribe (speech_to_text)")
    p.add_argument(
        "--demo",
        action="store_true",
        help="--num captions, images and continuations from the run's own val documents",
    )
    p.add_argument("--num", type=int, default=1, help="samples per prompt")
    p.add_argument(
        "--max-samples",
        type=int,
        default=MAX_NUM_SAMPLES,
        help="largest --num or prompts-line num_samples accepted",
    )
    p.add_argument(
        "--max-total-samples",
        type=int,
        default=MAX_TOTAL_SAMPLES,
        help="largest number of samples of one call (all prompts decode as one batch)",
    )
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale of image/speech spans")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--diffusion-steps", type=int, default=50, help="denoising passes per image (Transfusion)"
    )
    p.add_argument(
        "--sampler",
        default="auto",
        choices=["auto", "ddim", "ddpm", "euler"],  # objectives.diffusion.SAMPLERS
        help="image sampler (Transfusion): ddim or ddpm for objective.image_loss=ddpm, euler "
        "for flow; auto picks ddim or euler",
    )
    p.add_argument(
        "--stop-id", type=int, action="append", default=[], help="an id that ends a sample (repeat)"
    )
    p.add_argument("--checkpoint", type=int, default=None, help="step (default: the newest)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda[:N]")
    add_step_arguments(p)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser(
        "bench-generate",
        help="decode tokens/s: eager, static and compiled steps vs recomputing the prefix",
    )
    p.add_argument("--arch", default="mot", help="a preset name (mot, dense, moma-4t4i, ...)")
    p.add_argument("overrides", nargs="*", help="model.key=value overrides of the preset")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes, e.g. 1 8 32")
    p.add_argument(
        "--modes",
        nargs="+",
        default=None,
        choices=["recompute", "eager", "static", "compiled"],
        help="decode modes to time side by side (default: all; recompute: text only, at the "
        "smallest batch)",
    )
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument(
        "--images",
        action="store_true",
        help="time image span fills of a Transfusion preset (--arch tf-mot) instead of text: "
        "images/s and ms per denoising pass",
    )
    p.add_argument(
        "--diffusion-steps", type=int, default=50, help="--images: denoising passes per image"
    )
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=3.0,
        help="--images: guidance scale (a partner row per image; 1 = none)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="", help="write the row as JSON here")
    p.set_defaults(fn=cmd_bench_generate)
