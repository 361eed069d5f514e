"""Text -> image samples of several runs (or checkpoints, or sampling settings) side by side:
the same held-out captions and the same seeds in every row, the real images on top.

    python benchmarks/sample_grid.py runs/transfusion_cpu_long/dense-unet \\
        runs/transfusion_cpu_long/mot-unet --checkpoint 2400 --cfg 1 --cfg 3 \\
        --out docs/results/transfusion_cpu/samples_2400.png

Rows: the real held-out images, then one row per (run, checkpoint, CFG scale). Columns: the
first ``--prompts`` held-out captions of the run's corpus (the same split ``sparsefusion eval``
prompts with), each sampled with seed ``--seed + column``. A JSON beside the PNG lists the
captions and the rows.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sparsefusion.data.sources import build_source
from sparsefusion.eval.pairs import read_pairs
from sparsefusion.generate import DiffusionSettings, GenerationRequest, Generator
from sparsefusion.runs.folder import run_config

CELL, LABEL_W, CAPTION_H = 64, 150, 60


def _images(gen: Generator, captions: list[str], seed: int, cfg: float) -> list[Image.Image]:
    reqs = [
        GenerationRequest(prompt=c, mode="text_to_image", seed=seed + i, cfg_scale=cfg)
        for i, c in enumerate(captions)
    ]
    blank = Image.new("RGB", (CELL, CELL), "white")
    return [s.images[0] if s.images else blank for s in gen.generate(reqs)]


def _grid(real: list[Image.Image], captions: list[str], rows: list[tuple[str, list]]) -> Image:
    cols = len(real)
    top = CELL + CAPTION_H
    grid = Image.new("RGB", (LABEL_W + cols * CELL, top + len(rows) * CELL), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), "held-out\nreal image", fill="black")
    for j, (im, cap) in enumerate(zip(real, captions, strict=True)):
        x = LABEL_W + j * CELL
        grid.paste(im.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST), (x, 0))
        text = "\n".join(textwrap.wrap(cap, width=CELL // 6)[: CAPTION_H // 11])
        draw.multiline_text((x + 2, CELL + 2), text, fill="black", spacing=0)
    for i, (label, images) in enumerate(rows):
        y = top + i * CELL
        draw.multiline_text((4, y + 4), "\n".join(textwrap.wrap(label, 24)), fill="black")
        for j, im in enumerate(images):
            grid.paste(im.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST),
                       (LABEL_W + j * CELL, y))  # fmt: skip
    return grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders")
    ap.add_argument("--checkpoint", type=int, action="append", default=[],
                    help="step (repeatable; default: each run's newest)")  # fmt: skip
    ap.add_argument("--cfg", type=float, action="append", default=[], help="CFG scale(s)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--diffusion-steps", type=int, default=50)
    ap.add_argument("--sampler", default="auto")
    ap.add_argument("--step", default="auto", help="decode step (auto, eager, static, compiled)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="the PNG (a JSON is written beside it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = run_config(args.runs[0]).data
    pairs = read_pairs(build_source(data, seed=0, split="val"), args.prompts)
    captions = [p.caption for p in pairs]
    diffusion = DiffusionSettings(steps=args.diffusion_steps, sampler=args.sampler)
    rows, meta = [], []
    for run in args.runs:
        for ckpt in args.checkpoint or [None]:
            gen = Generator.from_run(run, checkpoint=ckpt, diffusion=diffusion, step=args.step)
            for cfg in args.cfg or [1.0]:
                guided = f" cfg {cfg:g}" if cfg != 1 else ""
                label = f"{Path(run).name} @{ckpt or 'last'}{guided}"
                rows.append((label, _images(gen, captions, args.seed, cfg)))
                meta.append({"run": run, "checkpoint": ckpt, "cfg_scale": cfg, "label": label})
                print(label, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _grid([p.image for p in pairs], captions, rows).save(out)
    settings = {"seed": args.seed, "diffusion_steps": args.diffusion_steps,
                "sampler": args.sampler}  # fmt: skip
    doc = {"captions": captions, "rows": meta, "settings": settings}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
