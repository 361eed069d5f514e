"""How good can Transfusion samples get through the image VAE? Train VAE variants on the scenes
corpus and score their round trip of held-out images with the evaluator networks (fid_sf,
clip_sf), beside real images: a perfect diffusion model cannot beat its VAE's round trip.

    python benchmarks/vae_ceiling.py --out docs/results/transfusion_cpu/vae_ceiling.json \\
        --variant steps=600 --variant steps=3000 --variant steps=3000,lr=1e-3

Each --variant is comma-separated ``key=value`` settings of ``tokenizer.vae`` (``steps`` is
``train_steps``). Uses the cached evaluators (``sparsefusion eval`` trains them once).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from sparsefusion.data.sources import build_source
from sparsefusion.eval.evaluators import EvaluatorConfig, load_or_train
from sparsefusion.eval.pairs import images_to_tensor, read_pairs
from sparsefusion.eval.scores import clip_sf, fid_sf
from sparsefusion.runs.presets import resolve_config
from sparsefusion.tokenizers.image_vae import ImageVAEConfig, train_vae


def _variant(text: str) -> ImageVAEConfig:
    kw: dict = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=")
        key = "train_steps" if key == "steps" else key
        kw[key] = (
            [int(v) for v in value.split("/")]
            if key == "channels"
            else type(getattr(ImageVAEConfig(), key))(value)
        )
    return replace(ImageVAEConfig(), **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", default=[], help="key=value[,key=value]")
    ap.add_argument("--images", type=int, default=8000, help="training images")
    ap.add_argument("--pairs", type=int, default=64, help="held-out pairs scored")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = resolve_config("tf-mot", []).data  # the demo's corpus (and its cached evaluators)
    train, val = (build_source(data, seed=0, split=s) for s in ("train", "val"))
    images = [p.image for p in read_pairs(train, args.images)]
    pairs = read_pairs(val, 2 * args.pairs)
    prompts, others = pairs[: args.pairs], pairs[args.pairs :]
    ev = load_or_train(EvaluatorConfig(), train, val, image_size=data.image_size)
    size = ev.features.image_size
    real = images_to_tensor([p.image for p in prompts], size)
    other = images_to_tensor([p.image for p in others], size)
    caps = [p.caption for p in prompts]
    rows = [{"variant": "real images", "fid_sf": fid_sf(ev.features, other, real),
             "clip_sf": clip_sf(ev, real, caps)}]  # fmt: skip
    for text in args.variant or ["steps=600"]:
        cfg = _variant(text)
        t0 = time.perf_counter()
        vae, report = train_vae(cfg, images)
        x = images_to_tensor(vae.decode(vae.encode([p.image for p in prompts])), size)
        rows.append({"variant": text, "fid_sf": fid_sf(ev.features, other, x),
                     "clip_sf": clip_sf(ev, x, caps), "seconds": time.perf_counter() - t0,
                     **report})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    for r in rows:
        print(f"{r['variant']:40s} fid_sf {r['fid_sf']:8.1f}  clip_sf {r['clip_sf']:6.1f}")


if __name__ == "__main__":
    main()
