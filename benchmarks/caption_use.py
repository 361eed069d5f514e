"""Does a Transfusion checkpoint use the caption when it denoises? Held-out diffusion loss of
the same images with the same noise and timesteps under three prefixes: the true caption, a
caption of another held-out image (shuffled), and no caption at all.

    python benchmarks/caption_use.py runs/transfusion_cpu_long/mot-unet --checkpoint 2400 \\
        --pairs 128 --out docs/results/transfusion_cpu/long/caption_use_mot-unet.json

A model that reads its caption has a clearly lower loss under the true caption than under a
shuffled one, most at high noise (where the image is least determined by its noisy latent).
Equal losses mean the image part ignores the text. Each row also gives the error of the clean
latent the prediction implies (``*_x0``): the sampler's first, noisiest steps decide an image's
layout from that estimate. Prints one row per timestep and the mean.

With U-Net patch layers a fourth column, ``skips_only``, is the true caption with the
transformer's output into the up half replaced by zeros: the up half then predicts from its
skip connections alone (the noisy latent itself). A loss there close to ``true`` means the
prediction barely needs the transformer, hence the caption.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from sparsefusion.data.documents import IMAGE, TEXT, Document, Segment
from sparsefusion.data.packing import PackBuffer
from sparsefusion.data.sources import build_source
from sparsefusion.eval.pairs import read_pairs
from sparsefusion.nn.unet_patch import UNetUp
from sparsefusion.objectives.base import build_objective
from sparsefusion.objectives.forward import forward_loss
from sparsefusion.runs.folder import load_model, run_config
from sparsefusion.runs.tokenizer import run_tokenizer

PREFIXES = ("true", "shuffled", "none")


def _documents(pairs, prefix: str) -> list[Document]:
    docs = []
    for i, p in enumerate(pairs):
        image = Segment(IMAGE, p.image)
        if prefix == "none":
            docs.append(Document([image]))
            continue
        caption = (
            pairs[(i + len(pairs) // 2) % len(pairs)].caption if prefix == "shuffled" else p.caption
        )
        docs.append(Document([Segment(TEXT, caption), image]))
    return docs


def _batch(tokenizer, docs: list[Document]):
    """One document per row (padded), so no caption is cut away from its image."""
    encoded = tokenizer.encode_documents(docs)
    buffer = PackBuffer.empty()
    buffer.extend(encoded, list(range(len(encoded))))
    rows, start = [], 0
    for e in encoded:
        rows.append((start, start + len(e.ids)))
        start += len(e.ids)
    return buffer.take(rows, max(len(e.ids) for e in encoded))


@torch.no_grad()
def per_image_errors(model, objective, batch, t_I, noise_IZhw) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the MSE of the model's prediction (the training loss) and of the clean latent
    it implies (``clean_estimate``; at high noise a small ddpm loss can hide a large x_0 error)."""
    batch.timestep_I, batch.noise_IZhw = t_I, noise_IZhw
    step = forward_loss(model, batch, objective)
    I = batch.num_images
    pred_InC = (
        step.model.predictions["noise_PC"].float().view(I, -1, step.inputs.target_PC.shape[-1])
    )
    target_InC = step.inputs.target_PC.view_as(pred_InC)
    xt_InC = step.inputs.patches_PC.float().view_as(pred_InC)
    t = objective.noise_schedule.fixed(t_I)
    process = objective.noise_schedule  # the exact target implies the true x_0
    x0_err = process.clean_estimate(xt_InC, pred_InC, t) - process.clean_estimate(
        xt_InC, target_InC, t
    )
    return (pred_InC - target_InC).pow(2).mean(dim=(1, 2)), x0_err.pow(2).mean(dim=(1, 2))


@contextlib.contextmanager
def _skips_only(head: UNetUp):
    """While inside, the U-Net's up half gets zeros instead of the transformer's output."""
    hook = head.register_forward_pre_hook(lambda mod, args: (torch.zeros_like(args[0]), *args[1:]))
    try:
        yield
    finally:
        hook.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--checkpoint", type=int, default=None)
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--timesteps", type=int, default=8, help="evenly spaced times per image")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = run_config(args.run)
    tokenizer = run_tokenizer(args.run, cfg)
    model, ckpt, _ = load_model(args.run, cfg, args.checkpoint)
    objective = build_objective(cfg.objective, cfg.model)
    pairs = read_pairs(build_source(cfg.data, seed=cfg.seed, split="val"), args.pairs)
    batches = {k: _batch(tokenizer, _documents(pairs, k)) for k in PREFIXES}
    x0 = batches["true"].latents_IZhw
    gen = torch.Generator().manual_seed(0)
    noise_IZhw = torch.randn(x0.shape, generator=gen)
    grid = objective.noise_schedule.grid(args.timesteps)
    rows = []
    for t in grid.tolist():
        t_I = torch.full((len(pairs),), t, dtype=grid.dtype)
        row = {"t": t}
        for k in PREFIXES:
            loss_I, x0_I = per_image_errors(model, objective, batches[k], t_I, noise_IZhw)
            row[k], row[f"{k}_x0"] = float(loss_I.mean()), float(x0_I.mean())
        if isinstance(model.patch_head, UNetUp):
            with _skips_only(model.patch_head):
                loss_I, x0_I = per_image_errors(model, objective, batches["true"], t_I, noise_IZhw)
            row["skips_only"], row["skips_only_x0"] = float(loss_I.mean()), float(x0_I.mean())
        rows.append(row)
        print(" ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    keys = [k for k in (*PREFIXES, "skips_only") if k in rows[0]]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}  # x_0 errors: per t only
    # The x_0 error of always predicting the held-out images' mean latent (no information).
    blind = float(x0.float().var(dim=0, unbiased=False).mean())
    report = {"run": str(args.run), "checkpoint": ckpt.name, "pairs": len(pairs),
              "mean": mean, "x0_error_of_the_mean_latent": blind, "by_timestep": rows}  # fmt: skip
    print("mean " + " ".join(f"{k} {v:.4g}" for k, v in mean.items()))
    print(f"x0 error of the mean latent: {blind:.4g}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
