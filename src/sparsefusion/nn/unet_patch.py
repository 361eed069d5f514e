"""U-Net patch layers: diffusers' U-Net down blocks in, up blocks out, the transformer between.

Transfusion (arXiv 2408.11039, section 3.2) offers two ways between a noised latent and the
transformer: a linear layer per k x k patch (``nn/patch_embed.py``) or the down and up halves of a
U-Net, which the paper finds much better at small model sizes. Here the transformer takes the
place of the U-Net's middle block:

- in (:class:`UNetDown`): ``conv_in`` on the whole latent (I, Z, h, w), then log2(k) + 1
  ``DownBlock2D`` (ResNet blocks; every block but the last halves the grid), so the last one
  leaves one cell per k x k patch; a linear map of each cell to the model width gives the
  patch positions in raster order, as ``patchify`` orders them;
- out (:class:`UNetUp`): RMSNorm and a linear map of each patch position's final hidden state
  back to the last block's channels, then ``UpBlock2D`` in mirror order, each taking the skip
  activations of its down block (what makes it a U-Net), and GroupNorm, SiLU, ``conv_out`` to
  the Z latent channels, cut back into patches: the prediction of every patch (noise or
  velocity, as the objective trains it).

Block widths are ``unet_width * 2 ** level``; ``unet_layers`` ResNet blocks per down block
(``unet_layers + 1`` per up block, as diffusers' ``UNet2DModel``); GroupNorm groups =
gcd(32, unet_width).

The timestep (a choice: the paper replaces the U-Net's AdaLayerNorm by a plain LayerNorm and
does not say how t then enters; the spec lists it as open): sinusoidal features through
diffusers' two-layer ``TimestepEmbedding`` give one vector per image, which every ResNet block
of both halves adds to its activations after its first convolution (diffusers'
``time_embedding_norm="default"``, the DDPM U-Net's way); the norms are plain GroupNorms. The
down half computes it once per image and hands it to the up half with the skips
(:class:`UNetState`).

All of it is image-only: in MoT these are image-tower parameters, in a dense model the only
image-specific ones. An image enters whole (packing never cuts a span), so the patches of a
call are image-major blocks of n = (latent_size / k) ** 2.

Shape legend: I = images, Z = latent channels, h = w = latent side, g = h / k (patch grid side),
n = g * g patches per image, P = I * n, C = Z * k * k values per patch, D = model width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sparsefusion.nn.patch_embed import patchify, unpatchify


def unet_levels(latent_size: int, patch_size: int) -> int:
    """Halvings from the latent to the patch grid, log2(k) (ValueError naming the keys)."""
    if patch_size & (patch_size - 1):
        raise ValueError(
            f"model.patch_layers=unet halves the latent log2(k) times: model.patch_size must be "
            f"a power of two, got {patch_size}"
        )
    if latent_size < 1 or latent_size % patch_size:
        raise ValueError(
            f"model.patch_layers=unet cannot halve a {latent_size}x{latent_size} latent down to "
            f"{patch_size}x{patch_size} patches: model.latent_size must be a positive multiple "
            f"of model.patch_size"
        )
    return patch_size.bit_length() - 1


@dataclass(frozen=True)
class UNetShape:
    """The sizes of a U-Net patch encoder/decoder.

    Attributes:
        latent_channels: Z.
        latent_size: h = w, the latent side.
        patch_size: k.
        dim: D, the model width.
        width: channels of the first level (level i has width * 2 ** i).
        layers: ResNet blocks per down block.
    """

    latent_channels: int
    latent_size: int
    patch_size: int
    dim: int
    width: int = 64
    layers: int = 1

    @property
    def channels(self) -> list[int]:
        levels = unet_levels(self.latent_size, self.patch_size)
        return [self.width * 2**i for i in range(levels + 1)]

    @property
    def groups(self) -> int:
        return math.gcd(32, self.width)

    @property
    def temb_dim(self) -> int:
        return 4 * self.width

    @property
    def grid(self) -> int:
        """g, the side of the patch grid."""
        return self.latent_size // self.patch_size

    @property
    def patches_per_image(self) -> int:
        return self.grid**2


@dataclass
class UNetState:
    """What the down half hands the up half: skip activations and each image's timestep vector."""

    skips: tuple[torch.Tensor, ...]
    temb_IE: torch.Tensor


def _blocks():
    try:
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.unets.unet_2d_blocks import DownBlock2D, UpBlock2D
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "model.patch_layers=unet builds on diffusers' U-Net blocks: "
            "pip install 'sparsefusion[transfusion]'"
        ) from e

    return Timesteps, TimestepEmbedding, DownBlock2D, UpBlock2D


def _reset(module: nn.Module) -> None:
    """PyTorch's default init on every conv, linear and norm (diffusers' own init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear | nn.GroupNorm | nn.RMSNorm):
            m.reset_parameters()


class UNetDown(nn.Module):
    """Latent patches (P, C) -> the model's patch positions (P, D) and the skips."""

    def __init__(self, shape: UNetShape):
        super().__init__()
        Timesteps, TimestepEmbedding, DownBlock2D, _ = _blocks()
        ch, self.shape = shape.channels, shape
        self.time_proj = Timesteps(shape.width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(shape.width, shape.temb_dim)
        self.conv_in = nn.Conv2d(shape.latent_channels, ch[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            DownBlock2D(
                in_channels=ch[max(i - 1, 0)],
                out_channels=c,
                temb_channels=shape.temb_dim,
                num_layers=shape.layers,
                resnet_groups=shape.groups,
                add_downsample=i < len(ch) - 1,
            )
            for i, c in enumerate(ch)
        )
        self.to_model = nn.Linear(ch[-1], shape.dim)

    def init_weights(self, std: float) -> None:
        _reset(self)
        nn.init.normal_(self.to_model.weight, std=std)
        nn.init.zeros_(self.to_model.bias)

    def forward(
        self, patches_PC: torch.Tensor, timestep_P: torch.Tensor
    ) -> tuple[torch.Tensor, UNetState]:
        s, n = self.shape, self.shape.patches_per_image
        P = patches_PC.shape[0]
        if P % n:
            raise ValueError(
                f"{P} patches are not whole images of {n} patches (U-Net patch layers)"
            )
        I = P // n
        latent = (s.latent_channels, s.latent_size, s.latent_size)
        x = unpatchify(patches_PC.view(I, n, -1), s.patch_size, latent)
        t_I = timestep_P.view(I, n)[:, 0]
        temb_IE = self.time_embed(self.time_proj(t_I).to(patches_PC.dtype))
        x = self.conv_in(x)
        skips: tuple[torch.Tensor, ...] = (x,)
        for block in self.blocks:
            x, states = block(x, temb_IE)
            skips += states
        h_PD = self.to_model(x.permute(0, 2, 3, 1).reshape(P, -1))  # raster order of the grid
        return h_PD, UNetState(skips, temb_IE)


class UNetUp(nn.Module):
    """Final hidden states of the patch positions (P, D) -> a prediction per patch (P, C)."""

    def __init__(self, shape: UNetShape, eps: float = 1e-5):
        super().__init__()
        *_, UpBlock2D = _blocks()
        ch, self.shape = shape.channels[::-1], shape
        self.norm = nn.RMSNorm(shape.dim, eps=eps)
        self.from_model = nn.Linear(shape.dim, ch[0])
        self.blocks = nn.ModuleList(
            UpBlock2D(
                in_channels=ch[min(i + 1, len(ch) - 1)],
                prev_output_channel=ch[max(i - 1, 0)],
                out_channels=c,
                temb_channels=shape.temb_dim,
                num_layers=shape.layers + 1,
                resnet_groups=shape.groups,
                add_upsample=i < len(ch) - 1,
            )
            for i, c in enumerate(ch)
        )
        self.norm_out = nn.GroupNorm(shape.groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], shape.latent_channels, 3, padding=1)

    def init_weights(self, std: float) -> None:
        _reset(self)
        nn.init.normal_(self.from_model.weight, std=std)
        nn.init.zeros_(self.from_model.bias)

    def forward(self, h_PD: torch.Tensor, state: UNetState) -> torch.Tensor:
        s, n = self.shape, self.shape.patches_per_image
        I, g = h_PD.shape[0] // n, s.grid
        x = self.from_model(self.norm(h_PD)).view(I, g, g, -1).permute(0, 3, 1, 2)
        skips = state.skips
        for block in self.blocks:
            take = len(block.resnets)
            skips, mine = skips[:-take], skips[-take:]
            x = block(x, mine, state.temb_IE)
        x = self.conv_out(nn.functional.silu(self.norm_out(x)))
        return patchify(x, s.patch_size).reshape(h_PD.shape[0], -1)


def _conv(c_in: int, c_out: int, k: int, cells: int) -> int:
    return 2 * c_in * c_out * k * k * cells


def _resnet(c_in: int, c_out: int, temb: int, cells: int) -> int:
    """conv1 3x3, the timestep projection, conv2 3x3 and a 1x1 shortcut when widths differ."""
    shortcut = _conv(c_in, c_out, 1, cells) if c_in != c_out else 0
    return (
        _conv(c_in, c_out, 3, cells) + 2 * temb * c_out + _conv(c_out, c_out, 3, cells) + shortcut
    )


def unet_flops_per_image(shape: UNetShape) -> int:
    """Forward matmul/conv FLOPs of both halves for one image (norms and activations count 0)."""
    ch, E, L = shape.channels, shape.temb_dim, shape.layers
    side = [shape.latent_size >> i for i in range(len(ch))]  # grid side of each level
    total = 2 * (shape.width * E + E * E)  # TimestepEmbedding
    total += _conv(shape.latent_channels, ch[0], 3, side[0] ** 2) * 2  # conv_in and conv_out
    skip_ch = [ch[0]]
    for i, c in enumerate(ch):  # down
        for j in range(L):
            total += _resnet(ch[max(i - 1, 0)] if j == 0 else c, c, E, side[i] ** 2)
            skip_ch.append(c)
        if i < len(ch) - 1:
            total += _conv(c, c, 3, side[i + 1] ** 2)  # stride-2 conv
            skip_ch.append(c)
    total += 2 * 2 * ch[-1] * shape.dim * shape.patches_per_image  # to_model and from_model
    rev = ch[::-1]
    for i, c in enumerate(rev):  # up: each resnet eats one skip, last one first
        level = len(ch) - 1 - i
        prev = rev[max(i - 1, 0)]
        for j in range(L + 1):
            total += _resnet((prev if j == 0 else c) + skip_ch.pop(), c, E, side[level] ** 2)
        if i < len(ch) - 1:
            total += _conv(c, c, 3, side[level - 1] ** 2)  # nearest x2 then a 3x3 conv
    return total
