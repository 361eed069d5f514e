"""Continuous image patches in and out of the transformer (Transfusion, arXiv 2408.11039).

``patchify`` cuts a latent (Z, h, w) into k x k patches in raster order (left to right, top to
bottom), each flattened to C = Z * k * k values in (Z, ky, kx) order; ``unpatchify`` inverts it.
:class:`PatchEmbed` maps a noised patch to the model width with a linear layer and adds an
embedding of its diffusion timestep (sinusoidal features through a two-layer SiLU MLP, as in
DiT). Transfusion adds the timestep embedding before its linear layer; adding it after, in the
model width, gives the timestep its own projection instead of sharing the patch's (a choice).
:class:`PatchHead` maps the final hidden state of a patch back to C values (the predicted noise).
Both are image-only parameters: in MoT they belong to the image tower, in a dense model they are
the only image-specific weights.

Shape legend: I = images, Z = latent channels, h/w = latent side, k = patch side, n = patches per
image, P = patches, C = values per patch, D = model width, F = timestep frequency features.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def patchify(x_IZhw: torch.Tensor, k: int) -> torch.Tensor:
    """Latents (I, Z, h, w) -> patches (I, n, C) in raster order, n = (h / k) * (w / k)."""
    I, Z, h, w = x_IZhw.shape
    if h % k or w % k:
        raise ValueError(f"patch size {k} does not divide the {h}x{w} latent")
    x = x_IZhw.reshape(I, Z, h // k, k, w // k, k).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(I, (h // k) * (w // k), Z * k * k)


def unpatchify(p_InC: torch.Tensor, k: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: patches (I, n, C) -> latents (I, Z, h, w) of ``shape``."""
    Z, h, w = shape
    I = p_InC.shape[0]
    x = p_InC.reshape(I, h // k, w // k, Z, k, k).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(I, Z, h, w)


def timestep_features(t_P: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (P, dim) of (possibly fractional) timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t_P.device) / half)
    angles_PF = t_P.float()[:, None] * freqs[None, :]
    return torch.cat([angles_PF.cos(), angles_PF.sin()], dim=-1)


class PatchEmbed(nn.Module):
    """Linear patch embedding plus a timestep embedding.

    Args:
        patch_dim: C, values per patch.
        dim: D, model width.
        freq_dim: F, sinusoidal timestep features.
    """

    def __init__(self, patch_dim: int, dim: int, freq_dim: int = 128):
        super().__init__()
        self.freq_dim = freq_dim
        self.proj = nn.Linear(patch_dim, dim)
        self.time_in = nn.Linear(freq_dim, dim)
        self.time_out = nn.Linear(dim, dim)

    def init_weights(self, std: float) -> None:
        for lin in (self.proj, self.time_in, self.time_out):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)

    def forward(self, patches_PC: torch.Tensor, timestep_P: torch.Tensor) -> torch.Tensor:
        """Embedded patches (P, D)."""
        feats_PF = timestep_features(timestep_P, self.freq_dim).to(patches_PC.dtype)
        t_PD = self.time_out(nn.functional.silu(self.time_in(feats_PF)))
        return self.proj(patches_PC) + t_PD

    def flops_per_patch(self) -> int:
        """Forward matmul FLOPs of one patch (patch projection and timestep MLP)."""
        return 2 * sum(lin.weight.numel() for lin in (self.proj, self.time_in, self.time_out))


class PatchHead(nn.Module):
    """RMSNorm and a linear map from the model width back to patch values.

    Args:
        dim: D, model width.
        patch_dim: C, values per patch.
        eps: RMSNorm epsilon.
    """

    def __init__(self, dim: int, patch_dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, patch_dim)

    def init_weights(self, std: float) -> None:
        nn.init.ones_(self.norm.weight)
        nn.init.normal_(self.proj.weight, std=std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h_PD: torch.Tensor) -> torch.Tensor:
        """Predicted noise per patch (P, C)."""
        return self.proj(self.norm(h_PD))

    def flops_per_patch(self) -> int:
        return 2 * self.proj.weight.numel()
