"""The decoding engine: prefill a batch of prompts, then extend every row token by token.

A :class:`Decoder` wraps a trained :class:`~sparsefusion.models.transformer.Transformer` and a
:class:`~sparsefusion.generate.kv_cache.KVCache`. Each call of :meth:`Decoder.extend` appends
any number of tokens to every row (a prefill is the first call; a decode step appends one token
per active row), builds the step's inputs on the host (ids, the tower plan from each token's
modality, positions and documents: a token after EOS opens a new document at position 0) and
runs the model once with the cache in the forward context. Batch-routed sites (expert choice,
Mixture-of-Depths) run in causal mode with the run's auxiliary routers.

``extend(..., commit=False)`` runs tokens against the cache without keeping them (their keys
and values are overwritten by the next call): the call a diffusion span sampler
(``span_samplers.py``) repeats for every denoising pass of an image span before committing the
span once; :meth:`Decoder.step` takes the step's continuous inputs (latent patches, timesteps)
and returns the whole model output. In "static"/"compiled" step mode the sampler instead lays
the spans out once (:meth:`Decoder.span_block`) and runs every pass through the static span
step (:meth:`Decoder.span_step`, ``static_span.py``): all rows, one fixed (B, n) block.

Shape legend: B = rows, T = tokens of a step, V = vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparsefusion.generate.kv_cache import KVCache, leading
from sparsefusion.generate.static import STEP_MODES, StaticStep
from sparsefusion.generate.static_span import SpanBlock, StaticSpanStep
from sparsefusion.models.inputs import ForwardContext, ModelInputs, plan_for
from sparsefusion.models.transformer import ModelOutput, Transformer
from sparsefusion.nn.routing_context import AuxRouterLookup
from sparsefusion.tokenizers.vocab import UnifiedVocab


class MissingAuxRouters(ValueError):
    """A model with batch-routed sites has no auxiliary routers for causal decoding."""


def aux_router_message(run_dir: str, sites: Sequence[str]) -> str:
    """The error text naming the command that makes the auxiliary routers."""
    shown = ", ".join(list(sites)[:4]) + (" ..." if len(sites) > 4 else "")
    return (
        f"this model has batch-routed sites ({shown}), which decode causally only with "
        f"auxiliary routers, and {run_dir} has none: run `sparsefusion train-aux {run_dir}` first"
    )


@dataclass
class RowState:
    """Where a row stands: its committed ids and the layout of the next token."""

    ids: list[int]
    next_position: int = 0
    document: int = 0
    last_id: int | None = None


class Decoder:
    """KV-cached incremental decoding of B rows.

    Args:
        model: the trained model (put in eval mode here).
        vocab: the unified vocabulary (token id -> modality).
        batch: rows B.
        capacity: tokens a row may hold (at most ``model.cfg.max_seq_len``).
        aux_routers: auxiliary routers (required when the model has batch-routed sites).
        run_dir: named in the missing-aux-routers message.
        step_mode: how :meth:`advance` runs one token per row: "eager" (the general step),
            "static" (the static-shape step, ``static.py``) or "compiled" (that step compiled);
            a diffusion span sampler fills image spans through the static span step
            (:meth:`span_step`) unless it is "eager".
    """

    def __init__(
        self,
        model: Transformer,
        vocab: UnifiedVocab,
        *,
        batch: int,
        capacity: int,
        aux_routers: AuxRouterLookup | None = None,
        run_dir: str = "RUN_DIR",
        step_mode: str = "eager",
    ):
        if step_mode not in STEP_MODES:
            raise ValueError(f"step_mode must be one of {STEP_MODES}, got {step_mode!r}")
        sites = list(model.router_sites())
        if sites and aux_routers is None:
            raise MissingAuxRouters(aux_router_message(run_dir, sites))
        max_len = model.cfg.max_seq_len
        if capacity > max_len:
            raise ValueError(f"capacity {capacity} exceeds the model's max_seq_len {max_len}")
        self.model, self.vocab = model.eval(), vocab
        self.aux_routers = aux_routers
        param = model.output.weight
        cfg = model.cfg
        self.cache = KVCache(
            num_layers=cfg.num_layers,
            batch=batch,
            capacity=capacity,
            kv_heads=cfg.kv_heads,
            head_dim=cfg.head_dim,
            dtype=param.dtype,
            device=param.device,
        )
        self.rows = [RowState(ids=[]) for _ in range(batch)]
        self.step_mode = step_mode
        self._static: StaticStep | None = None
        self._span_steps: dict[tuple[int, int], StaticSpanStep] = {}

    @property
    def static_step(self) -> StaticStep:
        """The static (or compiled) one-token step, built on first use."""
        if self._static is None:
            self._static = StaticStep(self, compile=self.step_mode == "compiled")
        return self._static

    def static_span_step(self, token: int, n: int) -> StaticSpanStep:
        """The static (or compiled) step of an image span of ``n`` ``token`` ids, built once."""
        key = (token, n)
        if key not in self._span_steps:
            compile = self.step_mode == "compiled"
            self._span_steps[key] = StaticSpanStep(self, token, n, compile=compile)
        return self._span_steps[key]

    def reset(self) -> None:
        """Forget every row (the cache's buffers and compiled steps are kept for reuse)."""
        self.rows = [RowState(ids=[]) for _ in self.rows]
        self.cache.reset()

    @property
    def batch(self) -> int:
        """Rows B."""
        return len(self.rows)

    @property
    def device(self) -> torch.device:
        return self.model.output.weight.device

    def context(self, cache: KVCache | None) -> ForwardContext:
        """Causal routing with the auxiliary routers (plain MoT/dense ignore the mode)."""
        return ForwardContext(routing_mode="causal", aux_routers=self.aux_routers, cache=cache)

    def extend(
        self,
        new_ids: Sequence[Sequence[int]],
        *,
        commit: bool = True,
        span_ids: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """Append ``new_ids[b]`` to row b (an empty list leaves the row as it is).

        Args:
            new_ids: the new ids of every row (ragged).
            commit: keep them in the cache and the rows (False: run them and forget them).
            span_ids: bidirectional span id of every new id (-1 = none), e.g. image patches.

        Returns:
            Logits (B, T, V) of the new positions (T = the longest list; rows are
            right-padded, so row b's real logits are ``[:, :len(new_ids[b])]``).
        """
        return self.step(new_ids, commit=commit, span_ids=span_ids).logits_BTV

    @torch.no_grad()
    def step(
        self,
        new_ids: Sequence[Sequence[int]],
        *,
        commit: bool = True,
        span_ids: Sequence[Sequence[int]] | None = None,
        **continuous: torch.Tensor,
    ) -> ModelOutput:
        """:meth:`extend` returning the whole model output (e.g. a diffusion head's predictions).

        ``continuous`` holds further ``ModelInputs`` fields of the step (``patches_PC``,
        ``patch_slot_P`` as ``row * T + t`` in the step's right-padded (B, T) layout,
        ``timestep_P``): a diffusion sampler runs an image span's noisy patches with
        ``commit=False`` for every denoising pass, then once more, clean, with ``commit=True``.
        """
        self._check_room([len(ids) for ids in new_ids])
        inputs = dataclasses.replace(self._inputs(new_ids, span_ids), **continuous)
        bound = max(len(row.ids) + len(ids) for row, ids in zip(self.rows, new_ids, strict=True))
        self.cache.begin([len(ids) for ids in new_ids], commit=commit, used=bound)
        out = self.model(inputs.to(self.device), self.context(self.cache))
        if commit:
            for row, ids in zip(self.rows, new_ids, strict=True):
                _advance(row, ids, self.vocab.eos_id)
        return out

    @torch.no_grad()
    def advance(self, ids: Sequence[int | None]) -> torch.Tensor:
        """Append one id to every row given one (None: the row stays); logits (B, V).

        The decode loop's step. In "static"/"compiled" mode it runs the static step: the host
        only lays out the ids (positions, documents) and copies them over in one transfer.
        """
        if len(ids) != len(self.rows):
            raise ValueError(f"advance got {len(ids)} ids, the decoder has {len(self.rows)} rows")
        if self.step_mode == "eager":
            step = [[] if i is None else [i] for i in ids]
            return self.last_logits(self.extend(step), step)
        self._check_room([0 if i is None else 1 for i in ids])
        columns = []  # (id, position, document, keep) of every row
        for row, i in zip(self.rows, ids, strict=True):
            if i is None:
                columns.append((self.vocab.pad_id, 0, 0, 0))
                continue
            (pos,), (doc,) = _layout(row, [i], self.vocab.eos_id)
            columns.append((i, pos, doc, 1))
        dev_4B = torch.tensor(columns, dtype=torch.long).T.contiguous().to(self.device)
        logits_BV = self.static_step(dev_4B[0], dev_4B[1], dev_4B[2], dev_4B[3].bool())
        for row, i in zip(self.rows, ids, strict=True):
            if i is not None:
                _advance(row, [i], self.vocab.eos_id)
        return logits_BV

    def span_block(
        self, new_ids: Sequence[Sequence[int]], span_ids: Sequence[Sequence[int]]
    ) -> SpanBlock:
        """Lay out an image span fill once, on the device, for :meth:`span_step`.

        Args:
            new_ids: :meth:`step`'s ids: n equal patch ids in every row that fills a span,
                none in the others.
            span_ids: the bidirectional span id of every new id.
        """
        counts = [len(ids) for ids in new_ids]
        tokens = {i for ids in new_ids for i in ids}
        if len(new_ids) != len(self.rows) or len(set(counts) - {0}) != 1 or len(tokens) != 1:
            raise ValueError("a span block holds n equal ids in every row that fills a span "
                             f"and none in the others, one list per row; got {counts}")  # fmt: skip
        self._check_room(counts)
        _, position, document, span = self._layout_BT(new_ids, span_ids)
        dev = self.device
        return SpanBlock(
            ids=[list(ids) for ids in new_ids],
            token=tokens.pop(),
            position_BT=position.to(dev),
            document_BT=document.to(dev),
            span_BT=span.to(dev),
            keep_BT=leading(counts, position.shape[1], dev),
        )

    @torch.no_grad()
    def span_step(
        self,
        block: SpanBlock,
        patches_PC: torch.Tensor,
        timestep_P: torch.Tensor,
        *,
        commit: bool,
    ) -> torch.Tensor:
        """One pass of an image span fill through the static span step (``static_span.py``).

        Args:
            block: the fill's layout (:meth:`span_block`).
            patches_PC: (B * n, C) patch values of every row, row-major (zeros in rows that do
                not fill; they are not kept and their predictions mean nothing).
            timestep_P: (B * n,) the model's timestep input of every patch.
            commit: keep the spans (the clean pass) and advance the filling rows.

        Returns:
            The patch head's prediction (B * n, C) of every slot (device tensor).
        """
        step = self.static_span_step(block.token, block.n)
        dev = self.device
        out_PC = step(block, patches_PC.to(dev), timestep_P.to(dev), commit=commit)
        if commit:
            for row, ids in zip(self.rows, block.ids, strict=True):
                _advance(row, ids, self.vocab.eos_id)
        return out_PC

    def last_logits(self, logits_BTV: torch.Tensor, new_ids: Sequence[Sequence[int]]):
        """Logits (B, V) at the last new position of every row (zeros for rows given none)."""
        idx_B = torch.tensor([max(0, len(ids) - 1) for ids in new_ids], device=logits_BTV.device)
        rows_B = torch.arange(logits_BTV.shape[0], device=logits_BTV.device)
        return logits_BTV[rows_B, idx_B]

    def _check_room(self, counts: Sequence[int]) -> None:
        """ValueError when row b cannot take ``counts[b]`` more tokens."""
        room = self.cache.capacity
        for b, (row, k) in enumerate(zip(self.rows, counts, strict=True)):
            if len(row.ids) + k > room:
                raise ValueError(
                    f"row {b} would hold {len(row.ids) + k} tokens; the cache holds {room}"
                )

    def _inputs(self, new_ids, span_ids) -> ModelInputs:
        tokens, position, document, span = self._layout_BT(new_ids, span_ids)
        modality = self.vocab.modality_of(tokens)
        return ModelInputs(
            tokens_BT=tokens,
            position_BT=position,
            document_BT=document,
            plan=_plan(self.model, modality),
            modality_BT=modality,
            span_BT=span,
        )

    def _layout_BT(self, new_ids, span_ids):
        """Ids, positions, documents and span ids (or None) of a step, right-padded (B, T)."""
        B = len(new_ids)
        T = max(1, max(len(ids) for ids in new_ids))
        pad = self.vocab.pad_id
        tokens = torch.full((B, T), pad, dtype=torch.long)
        position = torch.zeros(B, T, dtype=torch.long)
        document = torch.zeros(B, T, dtype=torch.long)
        span = torch.full((B, T), -1, dtype=torch.long) if span_ids is not None else None
        for b, (row, ids) in enumerate(zip(self.rows, new_ids, strict=True)):
            if not ids:
                continue
            pos, doc = _layout(row, ids, self.vocab.eos_id)
            tokens[b, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
            position[b, : len(ids)] = torch.tensor(pos)
            document[b, : len(ids)] = torch.tensor(doc)
            if span is not None and span_ids is not None:
                span[b, : len(ids)] = torch.tensor(list(span_ids[b]), dtype=torch.long)
        return tokens, position, document, span


def _plan(model: Transformer, modality_BT: torch.Tensor):
    return plan_for(model.cfg.tower_of_modality, model.cfg.num_towers, modality_BT)


def _layout(row: RowState, ids: Sequence[int], eos_id: int) -> tuple[list[int], list[int]]:
    """Positions and documents of ``ids`` appended to ``row`` (EOS closes a document)."""
    positions, documents = [], []
    pos, doc, last = row.next_position, row.document, row.last_id
    for i in ids:
        if last == eos_id:
            doc, pos = doc + 1, 0
        positions.append(pos)
        documents.append(doc)
        pos, last = pos + 1, i
    return positions, documents


def _advance(row: RowState, ids: Sequence[int], eos_id: int) -> None:
    if not ids:
        return
    positions, documents = _layout(row, ids, eos_id)
    row.ids.extend(ids)
    row.next_position, row.document, row.last_id = positions[-1] + 1, documents[-1], ids[-1]


def sequence_inputs(model: Transformer, vocab: UnifiedVocab, ids: Sequence[int]) -> ModelInputs:
    """Inputs of one whole row (B = 1) with the decoder's layout rule: the no-cache reference."""
    pos, doc = _layout(RowState(ids=[]), ids, vocab.eos_id)
    tokens = torch.tensor([list(ids)], dtype=torch.long)
    modality = vocab.modality_of(tokens)
    return ModelInputs(
        tokens_BT=tokens,
        position_BT=torch.tensor([pos]),
        document_BT=torch.tensor([doc]),
        plan=_plan(model, modality),
        modality_BT=modality,
    )
