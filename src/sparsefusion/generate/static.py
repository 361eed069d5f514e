"""The static decode step: one token per row against the KV cache, with shapes that never change.

A :class:`StaticStep` runs the model on ``(B, 1)`` tokens whose every input is a device tensor:
the ids, positions and documents, which rows keep their token (finished rows and padding do
not), and the tower of each token looked up on the device from the id (a per-token routing
plan: no host-side plan, no sort, no count). The KV cache's per-row lengths live on the device;
expert-choice and Mixture-of-Depths layers route causally through the auxiliary routers by
selection and masking (``RoutingContext.static``). So the step performs the same operations
whatever its tokens are, reads nothing back on the host, and compiles to one graph per batch size
(``torch.compile``; with ``mode="reduce-overhead"`` on a GPU, CUDA graphs).

The eager engine (:class:`~sparsefusion.generate.engine.Decoder`) still runs prefills and
anything ragged; both write the same cache buffers, so a row moves freely between them. A
diffusion run's image spans have a static step of their own (``static_span.py``: every row's n
patches as one fixed block); both steps share :func:`static_forward` and :class:`CompiledOnce`.

Shape legend: B = rows, T = tokens per row, V = vocabulary (logits width).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from sparsefusion.models.inputs import ForwardContext, ModelInputs
from sparsefusion.nn.routing import per_token_plan

if TYPE_CHECKING:
    from sparsefusion.generate.engine import Decoder
    from sparsefusion.models.transformer import ModelOutput

log = logging.getLogger(__name__)

STEP_MODES = ("eager", "static", "compiled")
DECODE_STEPS = ("auto", *STEP_MODES)  # what users choose: "auto" resolves per batch (generator.py)


def compile_mode(device: torch.device) -> str | None:
    """torch.compile mode of the decode step: CUDA graphs on a GPU, the default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None


def static_forward(
    decoder: Decoder, inputs: ModelInputs, keep_BT: torch.Tensor, *, commit: bool
) -> ModelOutput:
    """Run every row's next tokens against the decoder's cache with static shapes.

    Args:
        decoder: whose model, auxiliary routers and cache run the tokens.
        inputs: (B, T) tokens with a per-token plan or a plan whose counts never change.
        keep_BT: device bool, the tokens the cache keeps (the others are filler).
        commit: advance the cache's lengths (False: the next step overwrites the same slots).
    """
    decoder.cache.begin_static(keep_BT, commit=commit)
    ctx = ForwardContext(
        routing_mode="causal", aux_routers=decoder.aux_routers, cache=decoder.cache, static=True
    )
    return decoder.model(inputs, ctx)


class CompiledOnce:
    """A static step's forward, under ``torch.compile(fullgraph=True)`` when asked.

    The first call with each ``key`` (one graph per key, e.g. commit or not) holds the compile;
    it is timed, logged and summed into ``compile_seconds``.

    Args:
        fn: the forward.
        compile: compile it (else it runs as it is).
        device: the model's device (CUDA graphs on a GPU, see :func:`compile_mode`).
        what: names the step in the log line.
    """

    def __init__(self, fn: Callable[..., Any], *, compile: bool, device: torch.device, what: str):
        self.compiled, self.what = compile, what
        self.compile_seconds = 0.0
        self._fn = fn
        if compile:
            self._fn = torch.compile(fn, fullgraph=True, dynamic=False, mode=compile_mode(device))
        self._seen: set[Any] = set()

    def __call__(self, key: Any, *args: Any) -> Any:
        if not self.compiled or key in self._seen:
            return self._fn(*args)
        t0 = time.perf_counter()
        out = self._fn(*args)
        seconds = time.perf_counter() - t0
        self.compile_seconds += seconds
        self._seen.add(key)
        log.info("compiled the %s (%s) in %.1f s", self.what, key, seconds)
        return out


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
        what = f"decode step for batch {decoder.batch}"
        self._fn = CompiledOnce(self._forward, compile=compile, device=device, what=what)

    @property
    def compiled(self) -> bool:
        return self._fn.compiled

    @property
    def compile_seconds(self) -> float:
        """Seconds the first call spent compiling (0 when not compiled)."""
        return self._fn.compile_seconds

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
        return self._fn("commit", token_B, position_B, document_B, keep_B)

    def _forward(self, token_B, position_B, document_B, keep_B) -> torch.Tensor:
        model = self.decoder.model
        group_B = self.tower_V.index_select(0, token_B)
        inputs = ModelInputs(
            tokens_BT=token_B[:, None],
            position_BT=position_B[:, None],
            document_BT=document_B[:, None],
            plan=per_token_plan(group_B, model.cfg.num_towers),
            modality_BT=self.modality_V.index_select(0, token_B)[:, None],
        )
        return static_forward(self.decoder, inputs, keep_B[:, None], commit=True).logits_BTV[:, 0]
