"""Plain text forward of a sparsefusion decoder: ids in, logits out (one document per row).

What parity checks, the export round trip and the lm-eval model need: the model's own input
object built for rows of text ids (all positions of the text modality, modality index 0).

Shape legend: B = rows, T = tokens per row, V = vocabulary.
"""

from __future__ import annotations

import torch

from sparsefusion.models.inputs import ModelInputs
from sparsefusion.models.transformer import Transformer


def text_inputs(model: Transformer, ids_BT: torch.Tensor) -> ModelInputs:
    """Model inputs for rows of text-modality ids (positions 0..T-1, one document per row)."""
    B, T = ids_BT.shape
    device = model.output.weight.device
    ids_BT = ids_BT.to(device)
    modality_BT = torch.zeros_like(ids_BT)
    return ModelInputs(
        tokens_BT=ids_BT,
        position_BT=torch.arange(T, device=device).expand(B, T),
        document_BT=torch.zeros_like(ids_BT),
        plan=model.build_plan(modality_BT),
        modality_BT=modality_BT,
    )


@torch.no_grad()
def text_logits(model: Transformer, ids_BT: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, T, V) of rows of text ids."""
    return model(text_inputs(model, ids_BT)).logits_BTV
