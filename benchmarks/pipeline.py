"""Input-pipeline and training-step benchmark (issue 16); numbers go to docs/benchmarks.md.

Sections (``--sections``, comma-separated; all by default):

- ``loader``: tokens/s one worker (one thread, one CPU core) produces with the packed loader,
  for the built-in corpus (procedural scenes: drawing, BPE, the VQ encoder), for a user JSONL
  with PNG images (decode, resize, BPE, VQ), and for pre-tokenized shards
  (``sparsefusion data tokenize``: memory-map slices only).
- ``gpu``: tokens/s one GPU consumes at the 443M and 1.5B presets, from the training FLOPs per
  token (``models/flops.py``) at a stated MFU and bf16 peak, and the loader workers that rate
  needs for each pipeline.
- ``breakdown``: one demo training step cut into data, plan + FLOPs bookkeeping on the host,
  forward, backward, optimizer (clip + AdamW step) and logging; dense and MoT in turn.
- ``trainer``: ``sparsefusion train``'s own ``tokens_per_s`` at the demo size, dense and MoT,
  synchronous (``data.workers=0``) and background (``data.workers=1``) loading, in turn,
  ``--rounds`` times, so a shared machine's slow spells hit every variant alike.

Run from the repository root: ``python benchmarks/pipeline.py --out DIR``; ``--tiny`` shrinks
every section to the debug preset and a few steps (the GPU check's ``--dry-run``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sparsefusion.data.loader import PackedLoader
from sparsefusion.data.sources import build_source
from sparsefusion.runs.presets import resolve_config
from sparsefusion.tokenizers.build import load_or_train_tokenizer

PEAK_BF16 = 989e12  # H100 / H200 SXM dense bf16 FLOP/s


def _cfg(preset: str, args: argparse.Namespace, *extra: str):
    over = [f"tokenizer.cache_dir={args.cache}", f"train.threads={args.train_threads}", *extra]
    return resolve_config(preset, over)


def _loader_rate(source, tokenizer, cfg, batches: int) -> float:
    t0 = time.perf_counter()  # from construction: every chunk read and encoded is counted
    loader = PackedLoader(
        source, tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size
    )
    tokens = sum(loader.next_batch().num_tokens for _ in range(batches))
    return tokens / (time.perf_counter() - t0)


def _user_jsonl(source, folder: Path, num_docs: int, side: int) -> Path:
    """A JSONL with PNG images (``side`` px) of the first ``num_docs`` scene documents."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(num_docs):
        segs = []
        for j, seg in enumerate(source.document(i).segments):
            if seg.modality == "image":
                name = f"img/{i}_{j}.png"
                seg.payload.resize((side, side)).save(folder / name)
                segs.append({"image": name})
            else:
                segs.append({"text": seg.payload})
        lines.append(json.dumps(segs))
    path = folder / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def bench_loader(args: argparse.Namespace) -> dict[str, Any]:
    """Tokens/s per worker for the three pipelines (same tokenizer, same packing)."""
    from sparsefusion.data.token_shards import TokenShardSource
    from sparsefusion.data.tokenize import tokenize_to_dir

    cfg = _cfg(args.preset, args)
    scenes = build_source(cfg.data, seed=0, split="train")
    tok = load_or_train_tokenizer(cfg.tokenizer, scenes, progress=False, log=lambda m: None)
    docs = 128 if args.tiny else 1024
    out: dict[str, Any] = {"preset": args.preset, "seq_len": cfg.data.seq_len,
                           "batch_size": cfg.data.batch_size, "batches": args.batches}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = _user_jsonl(scenes, Path(tmp) / "user", docs, side=args.image_px)
        user_cfg = _cfg(args.preset, args, f"data.path={jsonl}", "data.val_fraction=0")
        user = build_source(user_cfg.data, seed=0, split="train")
        tokenize_to_dir({"train": scenes, "val": scenes}, tok, Path(tmp) / "tokens",
                        num_docs={"train": docs, "val": 1}, progress=False)  # fmt: skip
        shards = TokenShardSource(Path(tmp) / "tokens")
        for name, src in (("scenes", scenes), ("user_jsonl_png", user), ("token_shards", shards)):
            rates = [_loader_rate(src, tok, cfg, args.batches) for _ in range(args.rounds)]
            out[name] = {"tokens_per_s": statistics.median(rates), "rounds": rates}
    out["user_image_px"] = args.image_px
    return out


def bench_gpu_need(args: argparse.Namespace, loader: dict[str, Any] | None) -> dict[str, Any]:
    """Tokens/s one GPU consumes at ``--mfu`` for the 443M and 1.5B MoT presets."""
    from sparsefusion.models.flops import train_flops

    rows = {}
    for preset in ("mot-443m", "mot-1.5b"):
        cfg = resolve_config(preset, [])
        seq = cfg.data.seq_len
        doc_BT = torch.arange(4).repeat_interleave(seq // 4)[None, :]  # 4 documents per row
        # The preset's vocabulary: 16 specials + BPE + VQ codebook, padded to 64.
        vocab = -(-(16 + cfg.tokenizer.text_vocab_size + cfg.tokenizer.image.codebook_size) // 64)
        model = replace(cfg.model, vocab_size=vocab * 64)
        per_token = train_flops(model, doc_BT) / seq
        rate = args.mfu * PEAK_BF16 / per_token
        row = {"train_flops_per_token": per_token, "seq_len": seq, "vocab": vocab * 64,
               "gpu_tokens_per_s": rate}  # fmt: skip
        if loader:
            for name in ("scenes", "user_jsonl_png", "token_shards"):
                row[f"workers_{name}"] = rate / loader[name]["tokens_per_s"]
        rows[preset] = row
    return {"mfu": args.mfu, "peak_flops": PEAK_BF16, "presets": rows}


def bench_breakdown(args: argparse.Namespace) -> dict[str, Any]:
    """Per-phase milliseconds of a demo training step (median over steps), dense and MoT."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from step_breakdown import breakdown_rows

    return breakdown_rows(args)


def bench_trainer(args: argparse.Namespace) -> dict[str, Any]:
    """``sparsefusion train`` tokens/s: dense/MoT x sync/background, in turn, ``rounds`` times."""
    from sparsefusion.runs.folder import read_metrics
    from sparsefusion.train.trainer import train

    variants = [(a, w) for a in ("dense", "mot") for w in (0, 1)]
    runs: dict[str, list[float]] = {f"{a}/workers={w}": [] for a, w in variants}
    steps = args.trainer_steps
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arch, workers in variants:
                run_dir = Path(tmp) / f"{arch}-{workers}-{r}"
                preset = f"{arch}-debug" if args.tiny else arch
                cfg = _cfg(preset, args, f"run.dir={run_dir}", f"train.steps={steps}",
                           "run.log_every=10", "run.eval_every=0", f"run.save_every={steps}",
                           "run.progress=log", "run.tensorboard=false", "data.val_batches=1",
                           f"data.workers={workers}")  # fmt: skip
                train(cfg)
                rows = [x for x in read_metrics(run_dir / "metrics.jsonl") if "split" not in x]
                rates = [x["tokens_per_s"] for x in rows[1:]] or [rows[-1]["tokens_per_s"]]
                runs[f"{arch}/workers={workers}"].append(statistics.median(rates))
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratios = {f"mot/dense workers={w}": med[f"mot/workers={w}"] / med[f"dense/workers={w}"]
              for w in (0, 1)}  # fmt: skip
    per_round = {f"round {r} mot/dense workers={w}":
                 runs[f"mot/workers={w}"][r] / runs[f"dense/workers={w}"][r]
                 for r in range(args.rounds) for w in (0, 1)}  # fmt: skip
    gain = {a: med[f"{a}/workers=1"] / med[f"{a}/workers=0"] for a in ("dense", "mot")}
    return {"steps": steps, "tokens_per_s": runs, "median": med, "ratios": ratios,
            "per_round": per_round, "background_speedup": gain}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="", help="folder for pipeline.json (default: print only)")
    p.add_argument("--sections", default="loader,gpu,breakdown,trainer")
    p.add_argument("--preset", default="mot", help="loader section: preset of the data settings")
    p.add_argument("--batches", type=int, default=20, help="loader: batches timed per round")
    p.add_argument("--image-px", type=int, default=256, help="user JSONL: PNG side in pixels")
    p.add_argument("--rounds", type=int, default=2, help="repetitions, interleaved")
    p.add_argument("--steps", type=int, default=12, help="breakdown: timed steps per round")
    p.add_argument("--optim-impls", default="fused,for_loop", help="breakdown: AdamW variants")
    p.add_argument("--trainer-steps", type=int, default=60, help="trainer: steps per run")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="breakdown, trainer: torch threads of the training step (0: torch's default)",
    )
    p.add_argument("--mfu", type=float, default=0.4, help="gpu: assumed model FLOPs utilisation")
    p.add_argument("--cache", default=".cache/sparsefusion/tokenizers", help="tokenizer cache")
    p.add_argument("--tiny", action="store_true", help="debug sizes, a few steps (CI dry run)")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.batches, args.steps, args.trainer_steps = "mot-debug", 40, 2, 4
        args.rounds, args.image_px = 1, 64
    args.train_threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(1)  # the loader section measures one worker on one core
    sections = [s for s in args.sections.split(",") if s]
    result: dict[str, Any] = {"torch": torch.__version__, "tiny": args.tiny}
    for name in sections:
        t0 = time.perf_counter()
        if name == "loader":
            result["loader"] = bench_loader(args)
        elif name == "gpu":
            result["gpu"] = bench_gpu_need(args, result.get("loader"))
        elif name == "breakdown":
            result["breakdown"] = bench_breakdown(args)
        elif name == "trainer":
            result["trainer"] = bench_trainer(args)
        else:
            p.error(f"unknown section {name!r}")
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
        print(json.dumps(result[name], indent=1), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "pipeline.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
