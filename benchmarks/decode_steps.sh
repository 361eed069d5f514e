#!/usr/bin/env bash
# The decode-step tables of docs/benchmarks.md: eager vs static vs compiled (and recomputing the
# prefix) for the demo-size presets, 256 prompt + 256 new tokens, one thread, side by side; then
# image span fills of the Transfusion demo (50 denoising passes, B = 1 and 8 images, linear and
# U-Net patch layers).
#   bash benchmarks/decode_steps.sh [OUT_DIR]      (default docs/benchmarks/decode_steps)
set -euo pipefail
out=${1:-docs/benchmarks/decode_steps}
mkdir -p "$out"
sparsefusion bench-generate --arch mot --prompt-len 256 --new-tokens 256 --batch 1 8 32 \
  --threads 1 --out "$out/mot.json"
for a in dense moma-4t4i moma-4t4i-mod; do
  sparsefusion bench-generate --arch "$a" --prompt-len 256 --new-tokens 256 --batch 1 8 \
    --modes eager static compiled --threads 1 --out "$out/$a.json"
done
sparsefusion bench-generate --arch tf-mot --images objective.image_loss=ddpm model.patch_size=2 "tokenizer.vae.channels=[16,32,32]" --batch 1 8 32 \
  --diffusion-steps 50 --threads 1 --out "$out/tf-mot-images.json"
sparsefusion bench-generate --arch tf-mot --images model.patch_layers=unet objective.image_loss=ddpm model.patch_size=2 "tokenizer.vae.channels=[16,32,32]" \
  --batch 1 8 32 \
  --diffusion-steps 50 --threads 1 --out "$out/tf-mot-unet-images.json"
