"""Next-token cross-entropy with z-loss, broken down per modality.

A position's loss counts toward the modality of its *target* token (the token being predicted), so
``loss/image`` is the cross-entropy of predicting image codes; sentinels (BOS/EOS/BOI/EOI) are text.

Shape legend: B = batch rows, T = sequence length, V = vocabulary, M = modalities, N = B*T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsefusion.data.batch import IGNORE_INDEX


@dataclass(kw_only=True)
class ARObjectiveConfig:
    """Autoregressive objective settings.

    Attributes:
        z_loss: weight of the Chameleon z-loss ``(log Z)^2`` per token (0 disables it).
    """

    z_loss: float = 1e-5

    def __post_init__(self) -> None:
        if self.z_loss < 0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")


@dataclass
class LossOutput:
    """The differentiable loss and what to log.

    Attributes:
        loss: scalar to backpropagate (mean CE over valid targets + z-loss term).
        ce_sum_M: summed cross-entropy per modality (detached, float64).
        count_M: number of valid targets per modality (detached).
        z_loss: the mean z-loss term (detached).
    """

    loss: torch.Tensor
    ce_sum_M: torch.Tensor
    count_M: torch.Tensor
    z_loss: torch.Tensor


def ar_loss(
    logits_BTV: torch.Tensor,
    targets_BT: torch.Tensor,
    target_modality_BT: torch.Tensor,
    *,
    num_modalities: int,
    z_loss: float,
) -> LossOutput:
    """Cross-entropy (+ z-loss) over valid targets, with per-modality sums for logging."""
    logits_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1]).float()
    targets_N = targets_BT.reshape(-1)
    valid_N = targets_N != IGNORE_INDEX
    safe_targets_N = torch.where(valid_N, targets_N, torch.zeros_like(targets_N))
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    ce_N = (lse_N - logits_NV.gather(1, safe_targets_N[:, None]).squeeze(1)) * valid_N
    num_valid = valid_N.sum().clamp(min=1)
    loss = ce_N.sum() / num_valid
    z_term = ((lse_N**2) * valid_N).sum() / num_valid
    if z_loss > 0:
        loss = loss + z_loss * z_term
    bucket_N = torch.where(valid_N, target_modality_BT.reshape(-1), num_modalities)
    ce_sum = torch.zeros(num_modalities + 1, dtype=torch.float64, device=ce_N.device)
    ce_sum.scatter_add_(0, bucket_N, ce_N.detach().double())
    count = torch.bincount(bucket_N, minlength=num_modalities + 1)
    return LossOutput(loss, ce_sum[:num_modalities], count[:num_modalities], z_term.detach())
