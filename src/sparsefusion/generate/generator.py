"""The Python API: ``Generator.from_run(run_dir).generate([GenerationRequest(...)])``.

Every request is validated (and its prompt encoded) before any model work; then all samples of
all requests decode as one batch in one loop (each sample is a row; a guided sample adds its
unconditional row, a document that opens with BOI, as the model saw images without a caption)
and are decoded back to text, images and speech. Image spans come from the run's span sampler
(``span_samplers.py``): discrete codes sampled one by one, or continuous latents denoised
against the cache, as the run's objective says.

Batching rule: with a static or compiled step (``auto`` resolves to one of them) every call
decodes as one batch, so all images of the call denoise together through the static span step.
Only the eager step honours a span sampler that asks for a batch per sample
(``DiffusionSettings.batch_samples=False``, the default: each continuous sample, with its
guidance partner, decodes alone, bit for bit as before the generators merged).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from sparsefusion.data.documents import IMAGE, SPEECH, TEXT, Document
from sparsefusion.data.documents import Segment as DocSegment
from sparsefusion.generate.constraints import (
    MIN_SPEECH_UNITS,
    MODES,
    NEEDS_IMAGE,
    NEEDS_SPEECH,
    RowConstraint,
    SpanRules,
)
from sparsefusion.generate.decode import DecodeResult, RowSpec, capacity_for, decode
from sparsefusion.generate.engine import Decoder, MissingAuxRouters, aux_router_message
from sparsefusion.generate.output import Sample, Segment
from sparsefusion.generate.request import GUIDED_MODES, GenerationRequest
from sparsefusion.generate.sampling import SamplingParams, row_generator
from sparsefusion.generate.span_samplers import (
    CodeSpanSampler,
    DiffusionSettings,
    Prompt,
    SpanSampler,
    span_sampler_for,
)
from sparsefusion.generate.static import DECODE_STEPS
from sparsefusion.models.transformer import Transformer
from sparsefusion.nn.routing_context import AuxRouterLookup
from sparsefusion.tokenizers.multimodal import MultimodalTokenizer

if TYPE_CHECKING:
    from sparsefusion.tokenizers.transfusion import TransfusionTokenizer


COMPILE_FROM_TOKENS = 4096  # "auto" compiles a batch that decodes at least this many tokens
MIN_CAPACITY = 64
MAX_DECODERS = 8  # static decoders kept (least recently used dropped): their caches hold memory


def bucket(n: int) -> int:
    """The power of two >= n (batch sizes and cache lengths share compiled steps by bucket)."""
    return 1 << max(0, (n - 1).bit_length())


class Generator:
    """Samples from a trained model through its tokenizer.

    Args:
        model: the trained model.
        tokenizer: the run's tokenizer.
        aux_routers: the run's auxiliary routers (required with batch-routed sites).
        run_dir: named in messages.
        max_speech_units: longest speech span a sample may emit.
        span_sampler: how image spans are produced (default: discrete codes from
            ``tokenizer``); :meth:`from_run` picks the one of the run's objective.
        step: the decode step (``DECODE_STEPS``): "eager", "static", "compiled" (the static
            step compiled once per batch and length bucket, then reused) or "auto" (compiled
            for a batch of at least ``COMPILE_FROM_TOKENS`` new tokens, else static).
        max_decoders: static decoders kept for reuse, one per (step, batch bucket, length
            bucket); beyond it the least recently used one, with its KV cache, is dropped (a
            server that sees every shape would otherwise hold a cache per shape).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: MultimodalTokenizer | TransfusionTokenizer,
        aux_routers: AuxRouterLookup | None = None,
        *,
        run_dir: str = "RUN_DIR",
        max_speech_units: int = 256,
        span_sampler: SpanSampler | None = None,
        step: str = "auto",
        max_decoders: int = MAX_DECODERS,
    ):
        if step not in DECODE_STEPS:
            raise ValueError(f"step must be one of {DECODE_STEPS}, got {step!r}")
        if model.router_sites() and aux_routers is None:
            raise MissingAuxRouters(aux_router_message(run_dir, list(model.router_sites())))
        if span_sampler is None:
            assert isinstance(tokenizer, MultimodalTokenizer), "give a span sampler"
            span_sampler = CodeSpanSampler(tokenizer)
        self.model, self.tokenizer, self.aux_routers = model.eval(), tokenizer, aux_routers
        self.spans = span_sampler
        self.run_dir = run_dir
        self.step = step
        if max_decoders < 1:
            raise ValueError(f"max_decoders must be >= 1, got {max_decoders}")
        self.max_decoders = max_decoders
        self._decoders: OrderedDict[tuple[str, int, int], Decoder] = OrderedDict()  # LRU order
        self.run_config: Any = None  # the run's TrainConfig (set by from_run)
        self.checkpoint: Path | None = None
        has_image = IMAGE in model.cfg.modalities
        has_speech = tokenizer.speech is not None and SPEECH in model.cfg.modalities
        self.rules = SpanRules(
            tokenizer.vocab,
            model.cfg.vocab_size,
            image_tokens=span_sampler.image_tokens if has_image else 0,
            max_speech_units=max_speech_units if has_speech else 0,
            image_modes=span_sampler.image_modes,
            max_images=span_sampler.max_images,
        )

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        checkpoint: int | None = None,
        device: str = "cpu",
        diffusion: DiffusionSettings | None = None,
        step: str = "auto",
    ) -> Generator:
        """Load a run folder's newest (or ``checkpoint``-step) model, tokenizer, aux routers.

        ``diffusion`` sets how continuous images are sampled (runs whose objective has a noise
        schedule); discrete runs ignore it.
        """
        from sparsefusion.generate.run import load_run
        from sparsefusion.objectives.base import build_objective

        run = load_run(run_dir, checkpoint, device)
        objective = build_objective(run.config.objective, run.model.cfg)
        gen = cls(
            run.model,
            run.tokenizer,
            run.aux_routers,
            run_dir=str(run_dir),
            max_speech_units=run.max_speech_units,
            span_sampler=span_sampler_for(objective, run.tokenizer, run.model.cfg, diffusion),
            step=step,
        )
        gen.run_config, gen.checkpoint = run.config, run.checkpoint
        return gen

    # ---- what the run serves -------------------------------------------------------------------

    @property
    def modes(self) -> list[str]:
        """The modes this run can serve."""
        return [m for m in MODES if not self.why_not(m)]

    def why_not(self, mode: str) -> str:
        """Why ``mode`` cannot be served ("" when it can)."""
        if mode in NEEDS_IMAGE and not self.rules.image_tokens:
            return "the run has no image modality"
        if mode in NEEDS_SPEECH and not self.rules.max_speech_units:
            return "the run has no speech tokenizer"
        return ""

    @property
    def max_len(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def vocab_width(self) -> int:
        return self.model.cfg.vocab_size

    def min_new_tokens(self, mode: str) -> int:
        """Fewest new tokens a mode needs (an image span is BOI + L codes + EOI)."""
        if mode == "text_to_image":
            return self.rules.image_tokens + 2
        if mode == "text_to_speech":
            return MIN_SPEECH_UNITS + 2
        return 1

    # ---- prompts -------------------------------------------------------------------------------

    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        """The request's prompt as unified ids: BOS, its segments, no EOS."""
        return self.encode_prompt(req).ids

    def encode_prompt(self, req: GenerationRequest) -> Prompt:
        """The request's prompt: its ids (BOS, its segments, no EOS) and continuous inputs."""
        doc = req.document if req.document is not None else self._prompt_document(req)
        return self.spans.encode(doc)

    def _prompt_document(self, req: GenerationRequest) -> Document:
        segments = []
        if req.mode == "image_to_text":
            segments.append(DocSegment(IMAGE, self._image(req.image)))
        if req.mode == "speech_to_text":
            segments.append(DocSegment(SPEECH, _audio(req.audio)))
        if req.prompt:
            segments.append(DocSegment(TEXT, req.prompt))
        return Document(segments=segments)

    def _image(self, image) -> Image.Image:
        from sparsefusion.data.images import read_image, square_resize

        size = self.tokenizer.image.cfg.image_size
        if isinstance(image, Image.Image):
            return square_resize(image, size)
        return read_image(image, f"image {image}", size)

    # ---- generation ----------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        cancelled: Sequence[threading.Event | None] | None = None,
    ) -> list[Sample]:
        """One Sample per (request, sample index), in order; deterministic per seed.

        ``cancelled[r]``: an event that, once set, ends request r's rows at the next step (the
        other requests go on; r's samples end where they stopped).
        """
        if not requests:
            return []
        prompts, owners, result = self.decode(requests, cancelled)
        samples = []
        for (r, i), row_index in owners.items():
            req, new = requests[r], result.new_ids[row_index]
            gone = cancelled is not None and cancelled[r] is not None and cancelled[r].is_set()
            samples.append(
                Sample(  # a cancelled request's rows may end inside a span: no segments
                    segments=[] if gone else self.spans.segments(new, result.images[row_index]),
                    token_ids=list(new),
                    new_tokens=len(new),
                    seconds=result.seconds[row_index],
                    prompt=req.prompt,
                    mode=req.mode,
                    request=r,
                    index=i,
                    prompt_ids=prompts[r].ids,
                    prompt_segments=self.spans.input_segments(prompts[r]),
                )
            )
        return samples

    def decode(
        self,
        requests: Sequence[GenerationRequest],
        cancelled: Sequence[threading.Event | None] | None = None,
    ) -> tuple[list[Prompt], dict[tuple[int, int], int], DecodeResult]:
        """The encoded prompts, the row of every (request, sample index), the decoded rows.

        All rows decode as one batch, except with the eager step when the span sampler asks
        for a batch per sample (``batch_samples`` False): then each sample's rows decode as a
        batch of their own (see the module doc).
        """
        prompts = [req.encode(self) for req in requests]  # every check before model work
        rows, owners = self._rows(requests, prompts, cancelled)
        step = self.step_for(rows)
        if step != "eager" or self.spans.batch_samples:
            return prompts, owners, self._decode_batch(rows, step)
        result = DecodeResult([], [], [])
        for start in sorted(owners.values()):
            end = start + (2 if rows[start].guide is not None else 1)
            part = [
                dataclasses.replace(r, guide=None if r.guide is None else r.guide - start)
                for r in rows[start:end]
            ]
            one = self._decode_batch(part, step)
            result.new_ids += one.new_ids
            result.images += one.images
            result.seconds += one.seconds
        return prompts, owners, result

    def step_for(self, rows: Sequence[RowSpec]) -> str:
        """The decode step a batch runs with (``auto`` resolved by its token budget)."""
        if self.step != "auto":
            return self.step
        budget = sum(r.constraint.budget for r in rows)
        return "compiled" if budget >= COMPILE_FROM_TOKENS else "static"

    def _decode_batch(self, rows: list[RowSpec], step: str) -> DecodeResult:
        if step == "eager":
            decoder = self._decoder(step, len(rows), capacity_for(rows))
            return decode(decoder, rows, self.spans)
        # Static shapes: the batch and the cache length round up to buckets, and the decoder
        # (with its compiled step) is kept for the next batch of the same buckets.
        B = bucket(len(rows))
        capacity = min(self.max_len, max(bucket(capacity_for(rows)), MIN_CAPACITY))
        decoder = self._static_decoder(step, B, capacity)
        decoder.reset()
        padding = [self._idle_row() for _ in range(B - len(rows))]
        result = decode(decoder, [*rows, *padding], self.spans)
        n = len(rows)
        return DecodeResult(result.new_ids[:n], result.images[:n], result.seconds[:n])

    def _static_decoder(self, step: str, batch: int, capacity: int) -> Decoder:
        """The kept decoder of these buckets (made on first use; the least recently used one
        is dropped beyond ``max_decoders``)."""
        key = (step, batch, capacity)
        if key in self._decoders:
            self._decoders.move_to_end(key)
            return self._decoders[key]
        while len(self._decoders) >= self.max_decoders:
            self._decoders.popitem(last=False)
        self._decoders[key] = decoder = self._decoder(step, batch, capacity)
        return decoder

    def _decoder(self, step: str, batch: int, capacity: int) -> Decoder:
        return Decoder(
            self.model,
            self.tokenizer.vocab,
            batch=batch,
            capacity=capacity,
            aux_routers=self.aux_routers,
            run_dir=self.run_dir,
            step_mode=step,
        )

    def _idle_row(self) -> RowSpec:
        """A row that pads a batch to its bucket: one BOS, no budget (done from the start)."""
        bos = self.tokenizer.vocab.bos_id
        return RowSpec(
            prompt=[bos],
            constraint=RowConstraint(self.rules, "text", 0),
            params=SamplingParams(temperature=0.0),
            generator=torch.Generator(),
        )

    def _rows(
        self,
        requests: Sequence[GenerationRequest],
        prompts: Sequence[Prompt],
        cancelled: Sequence[threading.Event | None] | None = None,
    ) -> tuple[list[RowSpec], dict[tuple[int, int], int]]:
        rows: list[RowSpec] = []
        owners: dict[tuple[int, int], int] = {}
        for r, (req, prompt) in enumerate(zip(requests, prompts, strict=True)):
            budget = min(req.max_new_tokens, self.max_len - len(prompt.ids))
            cancel = None if cancelled is None else cancelled[r]
            for i in range(req.num_samples):
                owners[(r, i)] = len(rows)
                rows.append(self._row(req, prompt, budget, i))
                rows[-1].cancelled = cancel
                if req.cfg_scale != 1.0 and req.mode in GUIDED_MODES:
                    uncond = self._row(req, Prompt([self.tokenizer.vocab.bos_id]), budget, i)
                    uncond.follower, uncond.cancelled = True, cancel
                    rows[-1].guide, rows[-1].scale = len(rows), req.cfg_scale
                    rows.append(uncond)
        return rows, owners

    def _row(self, req: GenerationRequest, prompt: Prompt, budget: int, i: int) -> RowSpec:
        return RowSpec(
            prompt=list(prompt.ids),
            constraint=RowConstraint(self.rules, req.mode, budget),
            params=req.sampling(),
            generator=row_generator(req.seed, i),
            opening=self.rules.opening(req.mode),
            stop_ids=frozenset(req.stop_ids),
            patches=list(prompt.patches),
            penalize_prompt=self.spans.penalize_prompt,
        )

    def segments(self, ids: Sequence[int]) -> list[Segment]:
        """Decode unified ids of a discrete run into text / image / speech segments."""
        return self.spans.segments(ids, [])


def _audio(audio) -> torch.Tensor:
    from sparsefusion.data.audio import read_wav

    if isinstance(audio, torch.Tensor):
        return audio.float().reshape(-1)
    return read_wav(audio, f"audio {audio}")
