"""A small convolutional VQ-VAE image tokenizer, trained by the project (no pretrained weights).

Encoder: space-to-depth by ``downsample`` (PixelUnshuffle), a 3x3 conv and residual blocks at the
code resolution, a 1x1 conv to ``code_dim``. Working at the code resolution keeps a 1,500-step
training run near a minute on two CPU cores. Decoder: the mirror image, ending in PixelShuffle.
Codebook: nearest-neighbour quantisation with EMA updates (arXiv 1711.00937 appendix; decay 0.99,
Laplace smoothing), commitment loss ``beta * ||z - sg(q)||^2``, data-dependent initialisation and
dead-code restart (codes whose EMA usage falls below a threshold are re-seeded with random encoder
outputs of the current batch, as in Jukebox, arXiv 2005.00341), which keeps codebook usage high.

Pixels are scaled to [-1, 1] inside the model; reported MSE is on the [0, 1] scale.

Shape legend: N = images, C = 3 colour channels, H/W = image height/width, h/w = code grid,
L = h*w codes per image (raster order), D = code_dim, K = codebook_size, M = flattened code vectors.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm


@dataclass(kw_only=True)
class ImageVQConfig:
    """VQ-VAE image tokenizer settings.

    Attributes:
        image_size: side of the (square) input images; other sizes are resized.
        downsample: pixels per code along each side (32 / 4 -> an 8x8 code grid).
        codebook_size: number of codes K.
        code_dim: width D of a code vector.
        hidden: channel width of encoder and decoder.
        num_res_blocks: residual blocks in the encoder and in the decoder.
        train_steps: optimizer steps of :func:`train_vq`.
        batch_size: images per step.
        lr: peak Adam learning rate (linear warm-up, cosine decay to 10%).
        seed: seed of initialisation, batch sampling and codebook restarts.
        decay: EMA decay of the codebook statistics.
        beta: commitment-loss weight.
        dead_threshold: EMA usage below which a code is restarted.
        held_out: images held out for the report (taken from the end of a sequence).
    """

    image_size: int = 32
    downsample: int = 4
    codebook_size: int = 512
    code_dim: int = 32
    hidden: int = 64
    num_res_blocks: int = 2
    train_steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    decay: float = 0.99
    beta: float = 0.25
    dead_threshold: float = 1.0
    held_out: int = 256

    def __post_init__(self) -> None:
        for name in (
            "image_size",
            "downsample",
            "codebook_size",
            "code_dim",
            "hidden",
            "batch_size",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"ImageVQConfig.{name} must be positive, got {getattr(self, name)}"
                )
        if self.image_size % self.downsample:
            raise ValueError(
                f"ImageVQConfig.image_size ({self.image_size}) must be divisible by "
                f"downsample ({self.downsample})"
            )
        if self.train_steps < 0 or self.num_res_blocks < 0 or self.held_out < 0:
            raise ValueError("ImageVQConfig.train_steps/num_res_blocks/held_out must be >= 0")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"ImageVQConfig.decay must be in (0, 1), got {self.decay}")
        if self.lr <= 0 or self.beta < 0 or self.dead_threshold < 0:
            raise ValueError("ImageVQConfig.lr must be > 0, beta and dead_threshold >= 0")


class _ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x_NDhw: torch.Tensor) -> torch.Tensor:
        return x_NDhw + self.conv2(F.relu(self.conv1(F.relu(x_NDhw))))


def _trunk(c_in: int, c_out: int, hidden: int, num_blocks: int) -> list[nn.Module]:
    blocks = [_ResBlock(hidden) for _ in range(num_blocks)]
    return [nn.Conv2d(c_in, hidden, 3, padding=1), *blocks, nn.ReLU(), nn.Conv2d(hidden, c_out, 1)]


class EMACodebook(nn.Module):
    """Codebook with EMA updates, data-dependent init and dead-code restart.

    Args:
        codebook_size: number of codes K.
        code_dim: width D of a code.
        decay: EMA decay.
        eps: Laplace smoothing of the cluster sizes.
    """

    def __init__(self, codebook_size: int, code_dim: int, decay: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.decay = decay
        self.eps = eps
        self.register_buffer("embed_KD", torch.randn(codebook_size, code_dim))
        self.register_buffer("cluster_size_K", torch.ones(codebook_size))
        self.register_buffer("embed_sum_KD", self.embed_KD.clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def quantize(self, z_MD: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of every vector (squared Euclidean distance)."""
        e_KD = self.embed_KD
        dist_MK = (z_MD.pow(2).sum(1, keepdim=True) - 2 * z_MD @ e_KD.t()) + e_KD.pow(2).sum(1)
        return dist_MK.argmin(dim=1)

    @torch.no_grad()
    def init_from(self, z_MD: torch.Tensor, gen: torch.Generator) -> None:
        """Seed every code with a random encoder output (sampling with replacement if M < K)."""
        pick_K = _sample_rows(z_MD.shape[0], self.embed_KD.shape[0], gen, z_MD.device)
        self.embed_KD.copy_(z_MD[pick_K])
        self.embed_sum_KD.copy_(self.embed_KD)
        self.cluster_size_K.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def ema_update(self, z_MD: torch.Tensor, codes_M: torch.Tensor) -> None:
        """Move each code toward the mean of the vectors assigned to it."""
        K = self.embed_KD.shape[0]
        counts_K = torch.bincount(codes_M, minlength=K).to(z_MD.dtype)
        sums_KD = torch.zeros_like(self.embed_sum_KD).index_add_(0, codes_M, z_MD)
        self.cluster_size_K.mul_(self.decay).add_(counts_K, alpha=1 - self.decay)
        self.embed_sum_KD.mul_(self.decay).add_(sums_KD, alpha=1 - self.decay)
        n = self.cluster_size_K.sum()
        smoothed_K = (self.cluster_size_K + self.eps) / (n + K * self.eps) * n
        self.embed_KD.copy_(self.embed_sum_KD / smoothed_K.unsqueeze(1))

    @torch.no_grad()
    def restart_dead(self, z_MD: torch.Tensor, threshold: float, gen: torch.Generator) -> int:
        """Re-seed codes with EMA usage below ``threshold``; returns how many were restarted."""
        dead = (self.cluster_size_K < threshold).nonzero().squeeze(1)  # training only, not hot
        num_dead = int(dead.numel())
        if num_dead:
            pick = _sample_rows(z_MD.shape[0], num_dead, gen, z_MD.device)
            self.embed_KD[dead] = z_MD[pick]
            self.embed_sum_KD[dead] = z_MD[pick]
            self.cluster_size_K[dead] = 1.0
        return num_dead


def _sample_rows(
    num_rows: int, num: int, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    if num_rows >= num:
        return torch.randperm(num_rows, generator=gen)[:num].to(device)
    return torch.randint(num_rows, (num,), generator=gen).to(device)


@dataclass
class VQOutput:
    """Result of a training forward pass."""

    recon_NCHW: torch.Tensor
    codes_NL: torch.Tensor
    z_MD: torch.Tensor
    commit_loss: torch.Tensor


class VQImageTokenizer(nn.Module):
    """Images <-> discrete codes.

    Args:
        cfg: the model configuration.
    """

    def __init__(self, cfg: ImageVQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ds, D, hid, nb = cfg.downsample, cfg.code_dim, cfg.hidden, cfg.num_res_blocks
        pix = 3 * ds * ds
        self.encoder = nn.Sequential(nn.PixelUnshuffle(ds), *_trunk(pix, D, hid, nb))
        self.decoder = nn.Sequential(*_trunk(D, pix, hid, nb), nn.PixelShuffle(ds))
        self.codebook = EMACodebook(cfg.codebook_size, D, cfg.decay)
        self.codebook_size: int = cfg.codebook_size
        self.image_size: int = cfg.image_size
        self.grid: int = cfg.image_size // ds
        self.tokens_per_image: int = self.grid * self.grid

    @property
    def device(self) -> torch.device:
        return self.codebook.embed_KD.device

    # ---- tensor API ---------------------------------------------------------------------------

    def encode_latents(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> continuous code vectors, flattened to (N*L, D) in raster order."""
        z_NDhw = self.encoder(x_NCHW)
        return z_NDhw.permute(0, 2, 3, 1).reshape(-1, self.cfg.code_dim)

    def decode_codes(self, codes_NL: torch.Tensor) -> torch.Tensor:
        """Codes (N, L) -> pixels (N, C, H, W) in about [-1, 1]."""
        q_NLD = F.embedding(codes_NL, self.codebook.embed_KD)
        return self._decode_latents(q_NLD.reshape(-1, self.cfg.code_dim), codes_NL.shape[0])

    def _decode_latents(self, q_MD: torch.Tensor, n: int) -> torch.Tensor:
        q_NDhw = q_MD.reshape(n, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        return self.decoder(q_NDhw.contiguous())

    def forward(self, x_NCHW: torch.Tensor) -> VQOutput:
        """Training pass: encode, quantise (straight-through), decode."""
        z_MD = self.encode_latents(x_NCHW)
        codes_M = self.codebook.quantize(z_MD.detach())
        q_MD = F.embedding(codes_M, self.codebook.embed_KD)
        commit = F.mse_loss(z_MD, q_MD)
        q_st_MD = z_MD + (q_MD - z_MD).detach()
        recon = self._decode_latents(q_st_MD, x_NCHW.shape[0])
        return VQOutput(recon, codes_M.view(x_NCHW.shape[0], -1), z_MD, commit)

    @torch.no_grad()
    def encode_tensor(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> int64 codes (N, L)."""
        codes_M = self.codebook.quantize(self.encode_latents(x_NCHW))
        return codes_M.view(x_NCHW.shape[0], self.tokens_per_image)

    # ---- PIL API ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: list[Image.Image], chunk: int = 512) -> torch.Tensor:
        """RGB images -> int64 codes (N, tokens_per_image), raster order, on the CPU."""
        if not images:
            return torch.zeros(0, self.tokens_per_image, dtype=torch.long)
        was_training = self.training
        self.eval()
        out = []
        for i in range(0, len(images), chunk):
            x_NCHW = images_to_tensor(images[i : i + chunk], self.image_size).to(self.device)
            out.append(self.encode_tensor(x_NCHW).cpu())
        self.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, codes_NL: torch.Tensor) -> list[Image.Image]:
        """Int codes (N, tokens_per_image) -> RGB PIL images of side ``image_size``."""
        codes_NL = torch.as_tensor(codes_NL, dtype=torch.long)
        if codes_NL.dim() != 2 or codes_NL.shape[1] != self.tokens_per_image:
            raise ValueError(
                f"codes must be (N, {self.tokens_per_image}), got {tuple(codes_NL.shape)}"
            )
        if codes_NL.numel() == 0:
            return []
        if int(codes_NL.min()) < 0 or int(codes_NL.max()) >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        was_training = self.training
        self.eval()
        x_NCHW = self.decode_codes(codes_NL.to(self.device))
        self.train(was_training)
        return tensor_to_images(x_NCHW)

    # ---- persistence --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``<stem>.safetensors`` (weights and codebook) and ``<stem>.json`` (config)."""
        weights, config = _paths(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(weights))
        config.write_text(json.dumps(asdict(self.cfg), indent=2, sort_keys=True), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VQImageTokenizer:
        """Inverse of :meth:`save` (``path`` may name the .safetensors file or the stem)."""
        weights, config = _paths(path)
        cfg = ImageVQConfig(**json.loads(config.read_text(encoding="utf-8")))
        model = cls(cfg)
        model.load_state_dict(load_file(str(weights)))
        return model.eval()


def _paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def images_to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> float (N, C, size, size) in [-1, 1] (converted to RGB, resized if needed)."""
    arrays = []
    for img in images:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(img, dtype=np.uint8))
    x_NHWC = torch.from_numpy(np.stack(arrays))
    return x_NHWC.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def tensor_to_images(x_NCHW: torch.Tensor) -> list[Image.Image]:
    """Float (N, C, H, W) in [-1, 1] -> RGB PIL images."""
    x_NHWC = ((x_NCHW.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
    return [Image.fromarray(a) for a in x_NHWC.cpu().numpy()]


ImageSource = Sequence[Image.Image] | Callable[[int], Sequence[Image.Image]]


def train_vq(
    cfg: ImageVQConfig, images: ImageSource, progress: bool = False
) -> tuple[VQImageTokenizer, dict[str, float]]:
    """Train a VQ-VAE image tokenizer on CPU in fp32.

    Args:
        cfg: model and training settings.
        images: a sequence of PIL images (the last ``min(held_out, N // 10)`` are held out for the
            report), or a callable ``f(n) -> n images`` called once for the held-out set and once
            per training step.
        progress: show a tqdm progress bar.

    Returns:
        The trained tokenizer (in eval mode) and a report with ``recon_mse`` (held-out, [0, 1]
        pixel scale), ``codebook_usage`` (fraction of codes used on the held-out set),
        ``perplexity`` (of held-out code usage) and ``train_seconds``.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = VQImageTokenizer(cfg)
    sample, held_out_NCHW = _make_sampler(cfg, images, gen)
    bar = tqdm(total=cfg.train_steps, desc="image VQ", disable=not progress, leave=False)
    seconds = train_loop(model, sample, cfg, gen, on_step=lambda loss: _tick(bar, loss))
    bar.close()
    report = evaluate_vq(model, held_out_NCHW)
    report["train_seconds"] = seconds
    return model.eval(), report


def train_loop(
    model: VQImageTokenizer,
    sample: Callable[[], torch.Tensor],
    cfg: ImageVQConfig,
    gen: torch.Generator,
    on_step: Callable[[float], None] | None = None,
) -> float:
    """Adam on reconstruction + commitment loss; EMA codebook updates and dead-code restarts.

    Returns:
        Wall-clock seconds spent.
    """
    start = time.perf_counter()
    params = [*model.encoder.parameters(), *model.decoder.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    warmup = max(1, min(100, cfg.train_steps // 20))
    # No restarts in the last 10% of training: the decoder settles on the final codebook.
    restart_until = int(0.9 * cfg.train_steps)
    model.train()
    for step in range(cfg.train_steps):
        x_NCHW = sample().to(model.device)
        if not bool(model.codebook.initialized):
            with torch.no_grad():
                model.codebook.init_from(model.encode_latents(x_NCHW), gen)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, warmup, cfg.train_steps)
        out = model(x_NCHW)
        loss = F.mse_loss(out.recon_NCHW, x_NCHW) + cfg.beta * out.commit_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        z_MD = out.z_MD.detach()
        model.codebook.ema_update(z_MD, out.codes_NL.reshape(-1))
        if step < restart_until:
            model.codebook.restart_dead(z_MD, cfg.dead_threshold, gen)
        if on_step is not None:
            on_step(float(loss.detach()))
    return time.perf_counter() - start


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _tick(bar: tqdm, loss: float) -> None:
    bar.update(1)
    if bar.n % 50 == 0:
        bar.set_postfix(loss=f"{loss:.4f}")


def _make_sampler(
    cfg: ImageVQConfig, images: ImageSource, gen: torch.Generator
) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    size, bs = cfg.image_size, cfg.batch_size
    if callable(images):
        fn = images
        held = images_to_tensor(fn(max(cfg.held_out, 1)), size)
        return (lambda: images_to_tensor(fn(bs), size)), held
    if len(images) == 0:
        raise ValueError("train_vq needs at least one image")
    all_NCHW = images_to_tensor(images, size)
    n_held = min(cfg.held_out, len(images) // 10)
    train_NCHW = all_NCHW[: len(images) - n_held] if n_held else all_NCHW
    held_NCHW = all_NCHW[len(images) - n_held :] if n_held else all_NCHW
    n = train_NCHW.shape[0]
    return (lambda: train_NCHW[torch.randint(n, (bs,), generator=gen)]), held_NCHW


@torch.no_grad()
def evaluate_vq(model: VQImageTokenizer, x_NCHW: torch.Tensor, chunk: int = 512) -> dict[str, Any]:
    """Reconstruction MSE ([0, 1] scale), codebook usage and perplexity on images in [-1, 1]."""
    was_training = model.training
    model.eval()
    sq_err, counts_K = 0.0, torch.zeros(model.codebook_size)
    for i in range(0, x_NCHW.shape[0], chunk):
        x = x_NCHW[i : i + chunk].to(model.device)
        codes_NL = model.encode_tensor(x)
        recon = model.decode_codes(codes_NL).clamp(-1, 1)
        sq_err += float(((recon - x) / 2).pow(2).sum())
        counts_K += torch.bincount(codes_NL.reshape(-1).cpu(), minlength=model.codebook_size)
    model.train(was_training)
    p_K = counts_K / counts_K.sum().clamp_min(1)
    entropy = float(-(p_K * p_K.clamp_min(1e-12).log()).sum())
    return {
        "recon_mse": sq_err / max(x_NCHW.numel(), 1),
        "codebook_usage": float((counts_K > 0).float().mean()),
        "perplexity": math.exp(entropy),
    }
