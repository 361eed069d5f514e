"""Rotary position embeddings (RoPE, arXiv 2104.09864) from explicit per-token positions.

Positions come from the packed batch (restarting at 0 for every document), so the angles are
computed per batch from ``position_BT`` rather than sliced from a table: no buffers, which keeps
meta-device initialisation trivial. The rotation pairs channel i with channel i + K/2 (the
"rotate half" layout). Optional frequency scaling: Llama 3.1's ``llama3`` rule (long-wavelength
frequencies divided by ``factor``, a smooth ramp between ``low_freq_factor`` and
``high_freq_factor``), as Hugging Face ``transformers`` computes it.

Shape legend: B = batch rows, T = sequence length, H = heads, K = head dim, F = K / 2 frequencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(kw_only=True)
class RopeScalingConfig:
    """RoPE frequency scaling (``model.rope_scaling.*``).

    Attributes:
        kind: "none" (plain RoPE) or "llama3" (Llama 3.1/3.2 long-context scaling).
        factor: divisor of the low frequencies.
        low_freq_factor: wavelengths above ``original_max_position / low_freq_factor`` are
            scaled by ``1 / factor``.
        high_freq_factor: wavelengths below ``original_max_position / high_freq_factor`` are
            kept; those between are interpolated.
        original_max_position: context length of the unscaled model.
    """

    kind: Literal["none", "llama3"] = "none"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("none", "llama3"):
            raise ValueError(f"model.rope_scaling.kind must be 'none' or 'llama3': {self.kind!r}")
        if self.kind == "llama3":
            if not self.factor > 0 or self.original_max_position < 1:
                raise ValueError("model.rope_scaling: factor and original_max_position must be > 0")
            if not 0 < self.low_freq_factor < self.high_freq_factor:
                raise ValueError(
                    "model.rope_scaling: need 0 < low_freq_factor < high_freq_factor, got "
                    f"{self.low_freq_factor}, {self.high_freq_factor}"
                )


def llama3_inv_freq(inv_freq_F: torch.Tensor, scaling: RopeScalingConfig) -> torch.Tensor:
    """Scale inverse frequencies by the ``llama3`` rule (transformers' ``rope_type="llama3"``)."""
    old_len = scaling.original_max_position
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen_F = 2 * math.pi / inv_freq_F
    scaled_F = torch.where(wavelen_F > low_wavelen, inv_freq_F / scaling.factor, inv_freq_F)
    smooth_F = (old_len / wavelen_F - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed_F = (1 - smooth_F) * scaled_F / scaling.factor + smooth_F * scaled_F
    medium_F = (wavelen_F >= high_wavelen) & (wavelen_F <= low_wavelen)
    return torch.where(medium_F, smoothed_F, scaled_F)


@dataclass(frozen=True)
class RopeAngles:
    """Cosines and sines of the rotation angles of one batch, shared by every layer.

    Attributes:
        cos_BTF: cos(position * inv_freq), fp32.
        sin_BTF: sin(position * inv_freq), fp32.
    """

    cos_BTF: torch.Tensor
    sin_BTF: torch.Tensor


def rope_angles(
    position_BT: torch.Tensor,
    head_dim: int,
    theta: float = 10000.0,
    scaling: RopeScalingConfig | None = None,
) -> RopeAngles:
    """Compute the rotation angles for integer positions.

    Args:
        position_BT: position of every token inside its document.
        head_dim: K, must be even.
        theta: base of the geometric frequency progression.
        scaling: frequency scaling (None or kind "none": plain RoPE).

    Returns:
        The cos/sin tables, fp32, on the device of ``position_BT``.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponent_F = torch.arange(0, head_dim, 2, device=position_BT.device, dtype=torch.float32)
    inv_freq_F = theta ** (-exponent_F / head_dim)
    if scaling is not None and scaling.kind == "llama3":
        inv_freq_F = llama3_inv_freq(inv_freq_F, scaling)
    angle_BTF = position_BT.to(torch.float32)[..., None] * inv_freq_F
    return RopeAngles(cos_BTF=angle_BTF.cos(), sin_BTF=angle_BTF.sin())


def apply_rope(x_BTHK: torch.Tensor, angles: RopeAngles) -> torch.Tensor:
    """Rotate queries or keys by their positions' angles (computed in fp32, cast back).

    Args:
        x_BTHK: queries or keys.
        angles: from :func:`rope_angles` for the same B, T.

    Returns:
        The rotated tensor, same shape and dtype.
    """
    cos_BT1F = angles.cos_BTF.unsqueeze(2)
    sin_BT1F = angles.sin_BTF.unsqueeze(2)
    x1_BTHF, x2_BTHF = x_BTHK.float().chunk(2, dim=-1)
    out_BTHK = torch.cat(
        (x1_BTHF * cos_BT1F - x2_BTHF * sin_BT1F, x2_BTHF * cos_BT1F + x1_BTHF * sin_BT1F), dim=-1
    )
    return out_BTHK.type_as(x_BTHK)
