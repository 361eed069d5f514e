"""Rotary position embeddings (RoPE, arXiv 2104.09864) from explicit per-token positions.

Positions come from the packed batch (restarting at 0 for every document), so the angles are
computed per batch from ``position_BT`` rather than sliced from a table: no buffers, which keeps
meta-device initialisation trivial. The rotation pairs channel i with channel i + K/2 (the
"rotate half" layout).

Shape legend: B = batch rows, T = sequence length, H = heads, K = head dim, F = K / 2 frequencies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeAngles:
    """Cosines and sines of the rotation angles of one batch, shared by every layer.

    Attributes:
        cos_BTF: cos(position * inv_freq), fp32.
        sin_BTF: sin(position * inv_freq), fp32.
    """

    cos_BTF: torch.Tensor
    sin_BTF: torch.Tensor


def rope_angles(position_BT: torch.Tensor, head_dim: int, theta: float = 10000.0) -> RopeAngles:
    """Compute the rotation angles for integer positions.

    Args:
        position_BT: position of every token inside its document.
        head_dim: K, must be even.
        theta: base of the geometric frequency progression.

    Returns:
        The cos/sin tables, fp32, on the device of ``position_BT``.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponent_F = torch.arange(0, head_dim, 2, device=position_BT.device, dtype=torch.float32)
    inv_freq_F = theta ** (-exponent_F / head_dim)
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
