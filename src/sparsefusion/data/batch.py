"""The packed batch that flows from the data pipeline into the model and the objectives.

Shape legend: B = rows in the batch, T = sequence length, I = images with continuous latents,
Z = latent channels, h/w = latent side.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from sparsefusion.models.inputs import ModelInputs, plan_for

IGNORE_INDEX = -100


@dataclass
class Batch:
    """A batch of packed rows (on the host until an objective turns it into model inputs).

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
        span_BT: bidirectional span ids (-1 = none; e.g. the patches of one image), or None.
        latents_IZhw: clean continuous latents of the batch's images (Transfusion), in the
            order of their first patch slot, or None.
        image_slot_I: flattened position (row * T + t) of each image's first patch; its n
            patches fill the n consecutive positions.
        image_early_I: True for an image that precedes its caption (the noise limit applies).
        timestep_I: fixed diffusion timesteps per image (None: the objective samples them).
        noise_IZhw: fixed noise per image (None: the objective samples it).
        noise_seed: seed of a fixed noise draw (validation: same noise on every pass), or None.
    """

    tokens_BT: torch.Tensor
    targets_BT: torch.Tensor
    modality_BT: torch.Tensor
    target_modality_BT: torch.Tensor
    position_BT: torch.Tensor
    document_BT: torch.Tensor
    span_BT: torch.Tensor | None = None
    latents_IZhw: torch.Tensor | None = None
    image_slot_I: torch.Tensor | None = None
    image_early_I: torch.Tensor | None = None
    timestep_I: torch.Tensor | None = None
    noise_IZhw: torch.Tensor | None = None
    noise_seed: int | None = None

    @property
    def num_images(self) -> int:
        """Images with continuous latents in the batch (0 without latents)."""
        return 0 if self.latents_IZhw is None else int(self.latents_IZhw.shape[0])

    @property
    def num_tokens(self) -> int:
        return self.tokens_BT.numel()

    @property
    def num_targets(self) -> int:
        """Valid next-token targets (a host count when the batch is on the host)."""
        return int((self.targets_BT != IGNORE_INDEX).sum())

    def model_inputs(self, tower_of_modality: list[int], num_towers: int) -> ModelInputs:
        """The model's inputs for this batch, with its tower routing plan (built on the host)."""
        return ModelInputs(
            tokens_BT=self.tokens_BT,
            modality_BT=self.modality_BT,
            position_BT=self.position_BT,
            document_BT=self.document_BT,
            plan=plan_for(tower_of_modality, num_towers, self.modality_BT),
            span_BT=self.span_BT,
        )

    def to(self, device: torch.device | str) -> Batch:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        return type(self)(**out)
