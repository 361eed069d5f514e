"""Next-token cross-entropy with z-loss over the unified vocabulary, broken down per modality.

A position's loss counts toward the modality of its *target* token (the token being predicted), so
``loss/image`` is the cross-entropy of predicting image codes; sentinels (BOS/EOS/BOI/EOI) are text.
Both the cross-entropy and the z-loss are sums over valid targets, normalised by the global count
of valid targets (see ``objectives/base.py``).

Shape legend: B = batch rows, T = sequence length, V = vocabulary, N = B*T.
"""

from __future__ import annotations

import torch

from sparsefusion.data.batch import IGNORE_INDEX, Batch
from sparsefusion.models.inputs import ModelInputs
from sparsefusion.models.transformer import ModelConfig, ModelOutput
from sparsefusion.objectives.base import (
    LossTerm,
    ObjectiveConfig,
    ObjectiveOutput,
    per_modality_logged,
    register_objective,
)


def token_cross_entropy(
    logits_BTV: torch.Tensor, targets_BT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy and log-partition (0 where the target is ignored), and validity.

    Returns:
        ``(ce_N, lse_N, valid_N)``.
    """
    logits_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1]).float()
    targets_N = targets_BT.reshape(-1)
    valid_N = targets_N != IGNORE_INDEX
    safe_N = torch.where(valid_N, targets_N, torch.zeros_like(targets_N))
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    ce_N = (lse_N - logits_NV.gather(1, safe_N[:, None]).squeeze(1)) * valid_N
    return ce_N, lse_N * valid_N, valid_N


class NextTokenObjective:
    """Cross-entropy (+ z-loss) over every valid next-token target.

    Args:
        modalities: modality names in index order (for the per-modality breakdown).
        z_loss: weight of the z-loss term.
        towers: ``(tower_of_modality, num_towers)`` of the model (the routing plan).
    """

    noise_schedule = None  # images are discrete codes

    def __init__(self, modalities: list[str], z_loss: float, towers: tuple[list[int], int]):
        self.modalities, self.z_loss, self.towers = list(modalities), z_loss, towers

    def counts(self, batch: Batch) -> dict[str, int]:
        return {"targets": batch.num_targets}

    def prepare(self, batch: Batch, *, generator: torch.Generator | None = None) -> ModelInputs:
        return batch.model_inputs(*self.towers)

    def loss(self, output: ModelOutput, batch: Batch, inputs: ModelInputs) -> ObjectiveOutput:
        ce_N, lse_N, valid_N = token_cross_entropy(output.logits_BTV, batch.targets_BT)
        z_N = lse_N.square()
        terms = {"ce": LossTerm(ce_N.sum(), "targets")}
        if self.z_loss > 0:
            terms["z_loss"] = LossTerm(z_N.sum(), "targets", self.z_loss)
        count = valid_N.sum()
        logged = per_modality_logged(
            "loss", ce_N, batch.target_modality_BT, valid_N, self.modalities
        )
        logged["z_loss"] = (z_N.detach().double().sum(), count)
        return ObjectiveOutput(terms, {}, logged)


@register_objective("ar")
def _build(cfg: ObjectiveConfig, model: ModelConfig) -> NextTokenObjective:
    return NextTokenObjective(
        model.modalities, cfg.z_loss, (model.tower_of_modality, model.num_towers)
    )
