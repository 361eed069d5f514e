"""The packed batch that flows from the data pipeline into the model and the objectives.

Shape legend: B = rows in the batch, T = sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from sparsefusion.nn.routing import RoutingPlan, build_plan

IGNORE_INDEX = -100


@dataclass
class Batch:
    """A batch of packed rows.

    Attributes:
        tokens_BT: unified-vocabulary input ids (int64).
        targets_BT: next-token targets, ``IGNORE_INDEX`` where no loss is taken (the last token of
            a document, padding).
        modality_BT: modality index of each input token (sentinels such as BOS/EOS/BOI/EOI count
            as text, index 0). Decides the tower a position runs through.
        target_modality_BT: modality index of each target token (-1 where the target is ignored).
            Decides which per-modality loss a position counts towards.
        position_BT: position inside its document (restarts at 0 for every document).
        document_BT: document index inside the row (0, 1, 2, ...); attention never crosses it.
        plan: the tower routing plan over the flattened B*T positions (``None`` until
            :meth:`with_plan` is called).
    """

    tokens_BT: torch.Tensor
    targets_BT: torch.Tensor
    modality_BT: torch.Tensor
    target_modality_BT: torch.Tensor
    position_BT: torch.Tensor
    document_BT: torch.Tensor
    plan: RoutingPlan | None = None

    @property
    def num_tokens(self) -> int:
        return self.tokens_BT.numel()

    def with_plan(self, tower_of_modality: list[int], num_towers: int) -> Batch:
        """Attach the tower routing plan (built on the host, before moving to a device)."""
        lut = torch.tensor(tower_of_modality, dtype=torch.long)
        tower_N = lut[self.modality_BT.reshape(-1).cpu()]
        return replace(self, plan=build_plan(tower_N, num_towers))

    def to(self, device: torch.device | str) -> Batch:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
            elif v is not None:
                v = v.to(device)
            out[f.name] = v
        return Batch(**out)
