"""The static span step: one image span's n patches in every row at once, against the KV cache.

A diffusion run (``span_samplers.py``) fills an image span by running its n noisy patches
against the cached prefix once per denoising pass (``commit=False``: the cache is read and its
lengths stay; the next pass overwrites the same slots), then once more with the clean latent
(``commit=True``: the span is kept). :class:`StaticSpanStep` runs such a pass on a fixed
``(B, n)`` block: every row of the decoder's batch, whether or not it fills a span now. Every
input is a device tensor:

- built once per fill (:class:`SpanBlock`, from the decoder's own layout rule): positions,
  documents and the span's bidirectional id of every patch, and which rows fill (``keep``; the
  others' patches are zeros whose keys and values the cache never keeps and whose predictions
  are discarded);
- given per pass: the patch values of all B * n slots and their timesteps;
- fixed per step: the ids (the patch id), modality and tower of every slot (all image patches,
  so the tower plan's counts are known once: one tower holds every position, nothing is
  sorted), and each patch's slot.

Expert-choice and Mixture-of-Depths layers route through the auxiliary routers by selection and
masking (``RoutingContext.static``), as in the one-token step (``static.py``); every position
being a patch, the model computes no logits (``Transformer._heads``). So a pass reads nothing
back on the host and compiles to one graph per (batch, commit) when the decoder's step mode is
"compiled".

Shape legend: B = rows, T = n = patches per image, P = B * n patch slots, C = values per patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sparsefusion.generate.static import CompiledOnce, static_forward
from sparsefusion.models.inputs import ModelInputs, plan_for

if TYPE_CHECKING:
    from sparsefusion.generate.engine import Decoder


@dataclass(frozen=True)
class SpanBlock:
    """Where one fill's image spans sit in the step's fixed (B, n) block (built once per fill).

    Attributes:
        ids: every row's new ids (n patch ids in a filling row, none in the others).
        token: the patch id.
        position_BT: position of every patch in its document (zeros in rows not filling).
        document_BT: document of every patch.
        span_BT: bidirectional span id of every patch (-1 in rows not filling).
        keep_BT: True in the rows that fill a span.
    """

    ids: list[list[int]]
    token: int
    position_BT: torch.Tensor
    document_BT: torch.Tensor
    span_BT: torch.Tensor
    keep_BT: torch.Tensor

    @property
    def n(self) -> int:
        """Patches per image."""
        return self.position_BT.shape[1]


class StaticSpanStep:
    """A decoder's image-span pass over all B rows with static shapes (optionally compiled).

    Args:
        decoder: the decoder whose model, auxiliary routers and cache the step uses.
        token: the patch id (its modality decides the tower of every slot).
        n: patches per image.
        compile: compile the pass with ``torch.compile``: one graph for the denoising passes,
            one for the committing pass. ``compile_seconds`` sums both first calls.
    """

    def __init__(self, decoder: Decoder, token: int, n: int, *, compile: bool = False):
        self.decoder, self.token, self.n = decoder, token, n
        cfg, device = decoder.model.cfg, decoder.device
        tokens_BT = torch.full((decoder.batch, n), token, dtype=torch.long)
        modality_BT = decoder.vocab.modality_of(tokens_BT)
        self.plan = plan_for(cfg.tower_of_modality, cfg.num_towers, modality_BT).to(device)
        self.tokens_BT, self.modality_BT = tokens_BT.to(device), modality_BT.to(device)
        self.slot_P = torch.arange(tokens_BT.numel(), device=device)
        what = f"span step for batch {decoder.batch}"
        self._fn = CompiledOnce(self._forward, compile=compile, device=device, what=what)

    @property
    def compile_seconds(self) -> float:
        """Seconds the first calls (one per commit flag) spent compiling (0: not compiled)."""
        return self._fn.compile_seconds

    @torch.no_grad()
    def __call__(
        self,
        block: SpanBlock,
        patches_PC: torch.Tensor,
        timestep_P: torch.Tensor,
        *,
        commit: bool,
    ) -> torch.Tensor:
        """One pass; returns the patch head's prediction (P, C) of every slot (device tensor).

        Args:
            block: the fill's layout (:meth:`Decoder.span_block`).
            patches_PC: the patch values of every row, row-major (zeros in rows not filling).
            timestep_P: the timestep of every patch (the model's timestep input).
            commit: keep the filling rows' patches in the cache (the clean pass).
        """
        if block.token != self.token or block.n != self.n:
            raise ValueError(f"a span step of {self.n} ids {self.token} got a block of "
                             f"{block.n} ids {block.token}")  # fmt: skip
        args = (patches_PC, timestep_P, block.position_BT, block.document_BT, block.span_BT,
                block.keep_BT, commit)  # fmt: skip
        return self._fn(f"commit={commit}", *args)

    def _forward(
        self, patches_PC, timestep_P, position_BT, document_BT, span_BT, keep_BT, commit: bool
    ) -> torch.Tensor:
        inputs = ModelInputs(
            tokens_BT=self.tokens_BT,
            position_BT=position_BT,
            document_BT=document_BT,
            plan=self.plan,
            modality_BT=self.modality_BT,
            span_BT=span_BT,
            patches_PC=patches_PC,
            patch_slot_P=self.slot_P,
            timestep_P=timestep_P,
        )
        return static_forward(self.decoder, inputs, keep_BT, commit=commit).predictions["noise_PC"]
