"""A continuous image tokenizer for the Transfusion setting: a KL autoencoder trained here.

The network is diffusers' ``AutoencoderKL`` (arXiv 2112.10752), built from scratch (no downloaded
weights) and trained here on the run's images. Loss: per-pixel L1 (or L2, ``recon_loss``) plus
``kl_weight`` times the KL divergence of the posterior to N(0, I) (Transfusion uses 1e-6 next to
perceptual and GAN terms, which this CPU-sized tokenizer leaves out). With ``len(channels)``
encoder blocks the latent is ``2 ** (len(channels) - 1)`` times smaller per side: 32x32 RGB ->
8x8 x ``latent_channels`` by default. The mid-block self-attention is off (it dominated the CPU
step time at no visible gain on 32-pixel images).

``encode`` returns the posterior MEAN (deterministic, so a document encodes to the same latent on
every read) multiplied by ``scale``; ``scale`` is 1 / std of the training latents, measured after
training (as Stable Diffusion's ``scaling_factor``), so the diffusion model sees unit-variance
latents. ``decode`` divides it out. Input images are centre-cropped to a square and resized to
``image_size`` (``data/images.py: square_resize``) -- the rule for images that do not fit the
latent grid.

diffusers is an optional dependency (extra ``transfusion``); importing this module works without
it, building a model raises a message naming the extra.

Shape legend: N = images, C = 3 colour channels, H/W = image side, Z = latent channels,
h/w = latent side.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from sparsefusion.data.images import square_resize
from sparsefusion.tokenizers.image_vq import images_to_tensor, tensor_to_images

MISSING_DIFFUSERS = (
    "the Transfusion setting needs diffusers (AutoencoderKL, DDPM/DDIM schedulers): "
    "pip install 'sparsefusion[transfusion]'  (or: pip install diffusers)"
)


def require_diffusers() -> Any:
    """Import diffusers or raise an ImportError that names the extra to install."""
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(MISSING_DIFFUSERS) from e
    return diffusers


@dataclass(kw_only=True)
class ImageVAEConfig:
    """KL autoencoder (continuous image tokenizer) settings.

    Attributes:
        image_size: side of the square input images (others are centre-cropped and resized).
        latent_channels: channels Z of the latent.
        channels: output channels of each encoder block (decoder mirrors them); the latent side
            is ``image_size / 2 ** (len(channels) - 1)``.
        layers_per_block: ResNet layers per block.
        norm_groups: GroupNorm groups (must divide every entry of ``channels``).
        train_steps: optimizer steps of :func:`train_vae` (3000: on the scenes corpus the
            round trip of held-out images scores fid_sf 224 / clip_sf 57 against 437 / 37 after
            600 steps, real images 93 / 90; wider channels did not help; see
            ``benchmarks/vae_ceiling.py`` and docs/results/transfusion_cpu/).
        batch_size: images per step.
        lr: peak Adam learning rate (linear warm-up, cosine decay to 10%).
        kl_weight: weight of the KL term.
        recon_loss: "l1" or "l2" per-pixel reconstruction loss (on the [-1, 1] scale).
        seed: seed of initialisation and batch sampling.
        held_out: images held out for the report (taken from the end).
    """

    image_size: int = 32
    latent_channels: int = 4
    channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    layers_per_block: int = 1
    norm_groups: int = 8
    train_steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    kl_weight: float = 1e-6
    recon_loss: Literal["l1", "l2"] = "l1"
    seed: int = 0
    held_out: int = 128

    def __post_init__(self) -> None:
        for name in ("image_size", "latent_channels", "layers_per_block", "norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"tokenizer.vae.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"tokenizer.vae.{name} must be >= 1, got {getattr(self, name)}")
        if not self.channels or any(c < 1 or c % self.norm_groups for c in self.channels):
            raise ValueError(
                f"tokenizer.vae.channels must be positive multiples of norm_groups="
                f"{self.norm_groups}, got {self.channels}"
            )
        if self.image_size % self.downsample:
            raise ValueError(
                f"tokenizer.vae.image_size ({self.image_size}) must be divisible by the "
                f"downsampling {self.downsample} (2 ** (len(channels) - 1))"
            )
        if self.recon_loss not in ("l1", "l2"):
            raise ValueError(
                f"tokenizer.vae.recon_loss must be 'l1' or 'l2', got {self.recon_loss}"
            )
        if not (self.lr > 0 and self.kl_weight >= 0 and self.held_out >= 0):
            raise ValueError("tokenizer.vae: lr must be > 0, kl_weight and held_out >= 0")

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_side(self) -> int:
        """Latent grid side h = w."""
        return self.image_size // self.downsample


class VAEImageTokenizer(nn.Module):
    """Images <-> scaled continuous latents (Z, h, w) with diffusers' ``AutoencoderKL``.

    Args:
        cfg: the autoencoder settings.
    """

    def __init__(self, cfg: ImageVAEConfig) -> None:
        super().__init__()
        diffusers = require_diffusers()
        self.cfg = cfg
        n = len(cfg.channels)
        self.vae = diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(cfg.channels),
            layers_per_block=cfg.layers_per_block,
            latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.norm_groups,
            sample_size=cfg.image_size,
            mid_block_add_attention=False,
        )
        self.register_buffer("scale", torch.ones(()))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(Z, h, w) of one image's latent."""
        s = self.cfg.latent_side
        return self.cfg.latent_channels, s, s

    @property
    def device(self) -> torch.device:
        return self.scale.device

    def prepare(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (N, C, H, W) in [-1, 1], centre-cropped and resized to ``image_size``."""
        size = self.cfg.image_size
        fitted = [im if im.size == (size, size) else square_resize(im, size) for im in images]
        return images_to_tensor(fitted, size)

    @torch.no_grad()
    def encode_tensor(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled posterior means (N, Z, h, w), float32."""
        mean = self.vae.encode(x_NCHW.to(self.device)).latent_dist.mean
        return (mean * self.scale).float()

    @torch.no_grad()
    def decode_tensor(self, z_NZhw: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels (N, C, H, W), clamped to [-1, 1]."""
        x = self.vae.decode(z_NZhw.to(self.device) / self.scale).sample
        return x.clamp(-1, 1)

    def encode(self, images: Sequence[Image.Image], chunk: int = 256) -> torch.Tensor:
        """PIL images -> scaled latents (N, Z, h, w) on the host (empty input: (0, Z, h, w))."""
        if not images:
            return torch.zeros(0, *self.latent_shape)
        out = [
            self.encode_tensor(self.prepare(images[i : i + chunk])).cpu()
            for i in range(0, len(images), chunk)
        ]
        return torch.cat(out)

    def decode(self, z_NZhw: torch.Tensor) -> list[Image.Image]:
        """Scaled latents (N, Z, h, w) -> RGB PIL images of side ``image_size``."""
        return tensor_to_images(self.decode_tensor(z_NZhw).cpu())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``<stem>.safetensors`` (weights and scale) and ``<stem>.json`` (config)."""
        weights, meta = _paths(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(weights))
        meta.write_text(json.dumps({"config": asdict(self.cfg)}, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VAEImageTokenizer:
        """Inverse of :meth:`save` (eval mode, CPU)."""
        weights, meta = _paths(path)
        cfg = ImageVAEConfig(**json.loads(meta.read_text("utf-8"))["config"])
        model = cls(cfg)
        model.load_state_dict(load_file(str(weights)))
        return model.eval()


def _paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def train_vae(
    cfg: ImageVAEConfig, images: Sequence[Image.Image], progress: bool = False
) -> tuple[VAEImageTokenizer, dict[str, float]]:
    """Train the autoencoder on CPU in fp32, then measure the latent scale.

    Args:
        cfg: model and training settings.
        images: PIL images; the last ``min(held_out, N // 10)`` are held out for the report.
        progress: show a tqdm progress bar.

    Returns:
        The trained tokenizer (eval mode) and a report: ``recon_mse`` (held-out, [0, 1] pixel
        scale), ``recon_l1`` (same scale), ``latent_std`` (before scaling), ``train_seconds``.
    """
    if not images:
        raise ValueError("train_vae needs at least one image")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = VAEImageTokenizer(cfg)
    all_NCHW = model.prepare(images)
    n_held = min(cfg.held_out, len(images) // 10)
    train_NCHW = all_NCHW[: len(images) - n_held] if n_held else all_NCHW
    held_NCHW = all_NCHW[len(images) - n_held :] if n_held else all_NCHW
    opt = torch.optim.Adam(model.vae.parameters(), lr=cfg.lr)
    warmup = max(1, min(50, cfg.train_steps // 20))
    bar = tqdm(total=cfg.train_steps, desc="image VAE", disable=not progress, leave=False)
    start = time.perf_counter()
    model.train()
    for step in range(cfg.train_steps):
        x_NCHW = train_NCHW[torch.randint(train_NCHW.shape[0], (cfg.batch_size,), generator=gen)]
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, warmup, cfg.train_steps)
        loss = vae_loss(model, x_NCHW, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    std = _latent_std(model, train_NCHW[:512])
    model.scale.fill_(1.0 / max(std, 1e-6))
    report = evaluate_vae(model, held_NCHW)
    report.update(latent_std=std, train_seconds=seconds)
    return model, report


def vae_loss(
    model: VAEImageTokenizer, x_NCHW: torch.Tensor, cfg: ImageVAEConfig, gen: torch.Generator
) -> torch.Tensor:
    """Reconstruction (L1 or L2) of a posterior sample plus ``kl_weight`` * mean KL per image."""
    post = model.vae.encode(x_NCHW).latent_dist
    eps = torch.randn(post.mean.shape, generator=gen)
    recon = model.vae.decode(post.mean + post.std * eps).sample
    rec = (recon - x_NCHW).abs().mean() if cfg.recon_loss == "l1" else F.mse_loss(recon, x_NCHW)
    return rec + cfg.kl_weight * post.kl().mean()


@torch.no_grad()
def _latent_std(model: VAEImageTokenizer, x_NCHW: torch.Tensor) -> float:
    return float(model.vae.encode(x_NCHW).latent_dist.mean.std())


@torch.no_grad()
def evaluate_vae(model: VAEImageTokenizer, x_NCHW: torch.Tensor) -> dict[str, float]:
    """Held-out reconstruction errors on the [0, 1] pixel scale (through the scaled latent)."""
    recon = model.decode_tensor(model.encode_tensor(x_NCHW)).cpu()
    diff = (recon - x_NCHW) / 2
    return {"recon_mse": float(diff.pow(2).mean()), "recon_l1": float(diff.abs().mean())}


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
