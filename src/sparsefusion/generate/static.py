"""The static decode step: one token per row against the KV cache, with shapes that never change.

A :class:`StaticStep` runs the model on ``(B, 1)`` tokens whose every input is a device tensor:
the ids, positions and documents, which rows keep their token (finished rows and padding do
not), and the tower of each token looked up on the device from the id (a per-token routing
plan: no host-side plan, no sort, no count). The KV cache's per-row lengths live on the device;
expert-choice and Mixture-of-Depths layers route causally through the auxiliary routers by
selection and masking (``RoutingContext.static``). So the step performs the same operations
whatever its tokens are, reads nothing back on the host, and compiles to one graph per batch size
(``torch.compile``; with ``mode="reduce-overhead"`` on a GPU, CUDA graphs).

The eager engine (:class:`~sparsefusion.generate.engine.Decoder`) still runs prefills, image
spans and anything ragged; both write the same cache buffers, so a row moves freely between them.

Shape legend: B = rows, V = vocabulary (logits width).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from sparsefusion.models.inputs import ForwardContext, ModelInputs
from sparsefusion.nn.routing import per_token_plan

if TYPE_CHECKING:
    from sparsefusion.generate.engine import Decoder

log = logging.getLogger(__name__)

STEP_MODES = ("eager", "static", "compiled")
DECODE_STEPS = ("auto", *STEP_MODES)  # what users choose: "auto" resolves per batch (generator.py)


def compile_mode(device: torch.device) -> str | None:
    """torch.compile mode of the decode step: CUDA graphs on a GPU, the default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None


class StaticStep:
    """The decoder's one-token-per-row step with static shapes (optionally compiled).

    Args:
        decoder: the decoder whose model, auxiliary routers and cache the step uses.
        compile: compile the step with ``torch.compile`` (once per decoder: its batch size and
            cache are fixed). ``compile_seconds`` reports the first call's compile time.
    """

    def __init__(self, decoder: Decoder, *, compile: bool = False):
        self.decoder = decoder
        model, device = decoder.model, decoder.device
        width = model.output.weight.shape[0]
        ids_V = torch.arange(width)
        modality_V = decoder.vocab.modality_of(ids_V).clamp(max=len(model.cfg.modalities) - 1)
        lut = torch.tensor(model.cfg.tower_of_modality, dtype=torch.long)
        self.modality_V = modality_V.to(device)
        self.tower_V = lut[modality_V].to(device)
        self.compiled = compile
        self.compile_seconds = 0.0
        self._fn = self._forward
        if compile:
            self._fn = torch.compile(
                self._forward, fullgraph=True, dynamic=False, mode=compile_mode(device)
            )
        self._calls = 0

    @torch.no_grad()
    def __call__(
        self,
        token_B: torch.Tensor,
        position_B: torch.Tensor,
        document_B: torch.Tensor,
        keep_B: torch.Tensor,
    ) -> torch.Tensor:
        """Run one token per row; returns the logits (B, V) of every row (device tensor).

        Rows with ``keep_B`` False (finished, padding) leave the cache as it was; their logits
        are meaningless.
        """
        if self._calls == 0 and self.compiled:
            t0 = time.perf_counter()
            out = self._fn(token_B, position_B, document_B, keep_B)
            self.compile_seconds = time.perf_counter() - t0
            log.info("compiled the decode step for batch %d in %.1f s", token_B.shape[0],
                     self.compile_seconds)  # fmt: skip
        else:
            out = self._fn(token_B, position_B, document_B, keep_B)
        self._calls += 1
        return out

    def _forward(self, token_B, position_B, document_B, keep_B) -> torch.Tensor:
        decoder = self.decoder
        model, cache = decoder.model, decoder.cache
        group_B = self.tower_V.index_select(0, token_B)
        inputs = ModelInputs(
            tokens_BT=token_B[:, None],
            position_BT=position_B[:, None],
            document_BT=document_B[:, None],
            plan=per_token_plan(group_B, model.cfg.num_towers),
            modality_BT=self.modality_V.index_select(0, token_B)[:, None],
        )
        cache.begin_static(keep_B[:, None], commit=True)
        ctx = ForwardContext(
            routing_mode="causal", aux_routers=decoder.aux_routers, cache=cache, static=True
        )
        return model(inputs, ctx).logits_BTV[:, 0]
