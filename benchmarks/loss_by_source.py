"""A mixture run's loss per source, on held-out and on training documents.

A run on ``data.source=mixture`` logs one validation loss over the whole mix. This splits it:
for each source of the mix, the loss of the checkpoint on that source's first validation
batches and on its first training batches (documents the run trained on, packed the same way).
A training loss far below the validation loss on one source means the run memorised it (a
small source seen many times); the whole mix's validation loss then says more about that
source's size than about the architecture.

    python benchmarks/loss_by_source.py runs/realimg_long/dense runs/realimg_long/mot \\
        --batches 8 --out docs/results/realimg_long/loss_by_source.json

Prints a markdown table (one row per run, source and split) and writes the rows as JSON.
Batch-routed runs get their causal (aux-router) loss too when their routers exist.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparsefusion.eval.perplexity import routing_perplexity
from sparsefusion.runs.data import fixed_batches, source_batches
from sparsefusion.runs.folder import load_model, run_config
from sparsefusion.runs.tokenizer import run_tokenizer

SPLITS = ("val", "train")


def run_rows(run_dir: Path, checkpoint: int | None, batches: int) -> list[dict]:
    cfg = run_config(run_dir)
    tokenizer = run_tokenizer(run_dir, cfg)
    model, ckpt, state = load_model(run_dir, cfg, checkpoint, "cpu")
    rows = []
    for split in SPLITS:
        by_source = source_batches(cfg, split, tokenizer, num_batches=batches) or {
            cfg.data.source: fixed_batches(cfg, split, tokenizer, num_batches=batches)
        }
        for name, fixed in by_source.items():
            losses, _ = routing_perplexity(run_dir, model, cfg, torch.device("cpu"), fixed)
            row = {"run": run_dir.name, "step": int(state["step"]), "source": name, "split": split}
            rows.append(row | {k: v for k, v in losses.items() if k.startswith("loss/")})
    order = list(by_source)
    return sorted(rows, key=lambda r: order.index(r["source"]))  # stable: val before train


def markdown(rows: list[dict]) -> str:
    keys = ["loss/batch", "loss/batch/text", "loss/batch/image", "loss/causal"]
    keys = [k for k in keys if any(k in r for r in rows)]
    lines = ["| run | step | source | split | " + " | ".join(keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]  # fmt: skip
    for r in rows:
        cells = [f"{r[k]:.4f}" if k in r else "" for k in keys]
        lines.append(f"| {r['run']} | {r['step']} | {r['source']} | {r['split']} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--checkpoint", type=int, default=None, help="step (default: the newest)")
    ap.add_argument("--batches", type=int, default=8, help="batches per source and split")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the default)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r for run in args.runs for r in run_rows(run, args.checkpoint, args.batches)]
    print(markdown(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
