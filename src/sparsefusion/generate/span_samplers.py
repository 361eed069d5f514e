"""Span samplers: how the one decode loop (``decode.py``) produces an image span.

An image span is BOI, L ids, EOI. A span sampler is the generation side of a run's image
representation: it encodes prompts (their images included), produces the L ids of a span and
decodes a sample back into text, images and speech. The objective says which one a run uses
(:func:`span_sampler_for`):

- :class:`CodeSpanSampler` (discrete VQ codes, objective ``ar``): the loop samples the L codes
  one by one like any other id, constrained to the image codes; classifier-free guidance mixes
  the logits of a row and its unconditional partner.
- :class:`DiffusionSpanSampler` (continuous VAE latents, objective ``transfusion``; arXiv
  2408.11039 section 3.3): the span is filled as a whole. After BOI, n patches of pure noise
  are denoised for ``steps`` passes of a diffusers scheduler on the objective's image process
  (``objective.image_loss``: ``ddpm`` samples with DDPM, as the paper with 250 steps, or DDIM
  with fewer; ``flow`` integrates the predicted velocity with Euler steps; ``auto`` picks DDIM
  or Euler). Every pass re-runs the span against the cached prefix without committing it (the
  model only ever sees the latest x_t); the clean latent is then committed once at t = 0 and EOI
  follows. All rows of a decode batch that open a span at the same step are denoised together,
  each from its own random stream and its own scheduler. Guidance runs the unconditional
  partner row in the same passes and mixes the predictions (noise or velocity):
  ``e = e_u + s * (e_c - e_u)``. A prompt's images enter as clean patches (t = 0).

The model call of a pass: with the decoder's eager step, :meth:`Decoder.step` on the filling
rows' ragged ids (inputs built on the host each pass); with a static or compiled step, the
static span step (``static_span.py``): every row of the batch on one fixed (B, n) block laid
out once per fill, the rows that do not fill now given zero patches that the cache never keeps.
The loop around it (scheduler steps, guidance, random streams) is the same either way.

Batching and bit-identity: a row's random draws never depend on its batch, but its floats do in
the last bits (CPU matrix multiplies pick their kernel by the number of rows, e.g. one token per
step takes a matrix-vector path), and a latent decoded to 8-bit pixels turns such a difference
into a different byte now and then. Discrete runs have always decoded all samples as one batch.
Continuous runs do too with a static or compiled step (what the static span step is for: all
images of a call denoise together); with the eager step each sample (with its guidance partner)
decodes in a batch of its own unless ``DiffusionSettings.batch_samples`` is set, which keeps
their images identical to what they were before the generators merged.

Shape legend: Z/h/w = latent channels and side, n = patches per image, C = values per patch,
P = patches of a step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from sparsefusion.data.documents import IMAGE, SPEECH, TEXT, Document
from sparsefusion.generate.engine import Decoder
from sparsefusion.generate.output import Segment
from sparsefusion.nn.patch_embed import patchify, unpatchify
from sparsefusion.objectives.diffusion import SAMPLERS, resolve_sampler
from sparsefusion.tokenizers.multimodal import MultimodalTokenizer

if TYPE_CHECKING:
    from sparsefusion.models.transformer import ModelConfig
    from sparsefusion.objectives.base import Objective
    from sparsefusion.objectives.diffusion import DiffusionSchedule
    from sparsefusion.tokenizers.transfusion import TransfusionTokenizer


@dataclass
class Prompt:
    """A request's prompt as the decoder takes it.

    Attributes:
        ids: unified ids (BOS first, no EOS).
        patches: the clean latent patches of each prompt image: (index in ``ids`` of its first
            patch, (n, C) patches). Empty for discrete runs.
    """

    ids: list[int]
    patches: list[tuple[int, torch.Tensor]] = field(default_factory=list)


@dataclass
class OpenSpan:
    """A row whose image span a block sampler fills.

    Attributes:
        row: the row (it has just committed BOI).
        generator: the row's random stream (initial noise, DDPM draws).
        span: the span's bidirectional id in its row.
        guide: the unconditional partner row (classifier-free guidance), or None.
        scale: the guidance scale.
    """

    row: int
    generator: torch.Generator
    span: int
    guide: int | None = None
    scale: float = 1.0


class SpanSampler(Protocol):
    """What the generator and the decode loop need of an image representation.

    Attributes:
        image_tokens: ids between BOI and EOI.
        image_modes: modes in which a row may open an image span itself.
        max_images: most image spans a row may open itself (None: no limit).
        penalize_prompt: the repetition penalty counts the prompt's ids (else only new ones).
        batch_samples: all samples of a ``generate`` call decode as one batch (else each
            sample, with its guidance partner, in a batch of its own; eager step only).
    """

    image_tokens: int
    image_modes: tuple[str, ...]
    max_images: int | None
    penalize_prompt: bool
    batch_samples: bool

    def encode(self, doc: Document) -> Prompt:
        """A prompt document as ids (and continuous inputs), without EOS."""
        ...

    def opens_block(self, token: int) -> bool:
        """Whether ``token`` opens a span this sampler fills as a whole (see :meth:`fill`)."""
        ...

    def fill(self, decoder: Decoder, spans: Sequence[OpenSpan]) -> list[torch.Tensor]:
        """Fill the span of every row in ``spans`` (and its partner) and commit it (no EOI)."""
        ...

    @property
    def span_ids(self) -> list[int]:
        """The ids a filled span commits."""
        ...

    def segments(self, ids: Sequence[int], images: Sequence[torch.Tensor]) -> list[Segment]:
        """New ids (and the images :meth:`fill` made) as text / image / speech segments."""
        ...

    def input_segments(self, prompt: Prompt) -> list[Segment]:
        """The prompt's non-text inputs shown beside a sample."""
        ...


class CodeSpanSampler:
    """Discrete image codes: the decode loop samples them one by one under the constraints.

    Args:
        tokenizer: the run's multimodal (VQ) tokenizer.
    """

    image_modes = ("interleaved",)
    max_images = None
    penalize_prompt = True
    batch_samples = True

    def __init__(self, tokenizer: MultimodalTokenizer):
        self.tokenizer = tokenizer
        self.image_tokens = tokenizer.image.tokens_per_image

    def encode(self, doc: Document) -> Prompt:
        if not doc.segments:
            return Prompt([self.tokenizer.vocab.bos_id])
        ids, _ = self.tokenizer.encode_document(doc)
        return Prompt(ids[:-1])  # drop EOS: the model continues the document

    def opens_block(self, token: int) -> bool:
        return False

    def fill(self, decoder: Decoder, spans: Sequence[OpenSpan]) -> list[torch.Tensor]:
        raise AssertionError("codes are sampled one by one; no span is filled as a whole")

    @property
    def span_ids(self) -> list[int]:
        return []

    def segments(self, ids: Sequence[int], images: Sequence[torch.Tensor] = ()) -> list[Segment]:
        from sparsefusion.data.audio import SAMPLE_RATE

        out = []
        for seg in self.tokenizer.decode(list(ids)):
            if seg.modality == TEXT:
                out.append(Segment(TEXT, text=seg.payload))
            elif seg.modality == IMAGE:
                out.append(Segment(IMAGE, image=seg.payload))
            else:
                wave = torch.as_tensor(seg.payload).detach().float().cpu().numpy()
                out.append(Segment(SPEECH, audio=wave, sample_rate=SAMPLE_RATE))
        return out

    def input_segments(self, prompt: Prompt) -> list[Segment]:
        vocab = self.tokenizer.vocab
        if vocab.boi_id not in prompt.ids and vocab.boa_id not in prompt.ids:
            return []
        return [s for s in self.segments(prompt.ids) if s.modality != TEXT]


@dataclass
class DiffusionSettings:
    """How continuous images are sampled.

    Attributes:
        steps: denoising passes per image (the paper evaluates DDPM with 250).
        sampler: "auto" (the image process's own: ddim for ``ddpm``, euler for ``flow``),
            "ddim" (deterministic, good with few steps) or "ddpm" (ancestral) for
            ``objective.image_loss=ddpm``, "euler" for ``flow``.
        max_images: most images one sample may open itself (``text``/``interleaved``).
        batch_samples: with the eager step, decode all samples of a ``generate`` call as one
            batch (faster; their floats then differ in the last bits from one sample decoded
            alone, see the module doc). Off: each sample in a batch of its own, as before the
            generators merged. A static or compiled step always decodes one batch.
    """

    steps: int = 50
    sampler: str = "auto"
    max_images: int = 1
    batch_samples: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"diffusion steps must be >= 1, got {self.steps}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {self.sampler!r}")


class DiffusionSpanSampler:
    """Continuous image latents, denoised against the KV cache (see the module doc).

    Args:
        tokenizer: the run's latent (VAE) tokenizer.
        patch_size: the model's patch side k.
        schedule: the objective's image process (DDPM or flow).
        settings: steps, sampler and image limit.

    Raises:
        ValueError: the sampler does not fit the process (e.g. ``ddim`` on ``flow``).
    """

    image_modes = ("text", "interleaved")
    penalize_prompt = False  # as the former separate Transfusion generator: new ids only

    def __init__(
        self,
        tokenizer: TransfusionTokenizer,
        patch_size: int,
        schedule: DiffusionSchedule,
        settings: DiffusionSettings | None = None,
    ):
        self.tokenizer, self.k, self.schedule = tokenizer, patch_size, schedule
        self.settings = settings or DiffusionSettings()
        self.sampler = resolve_sampler(schedule, self.settings.sampler)
        self.image_tokens = tokenizer.patches_per_image(patch_size)

    @property
    def max_images(self) -> int:
        return self.settings.max_images

    @property
    def batch_samples(self) -> bool:
        return self.settings.batch_samples

    @property
    def span_ids(self) -> list[int]:
        return [self.tokenizer.patch_id] * self.image_tokens

    def encode(self, doc: Document) -> Prompt:
        if not doc.segments:
            return Prompt([self.tokenizer.vocab.bos_id])
        (enc,) = self.tokenizer.encode_latent_documents([doc], self.k)
        patches = [
            (boi + 1, patchify(z[None].float(), self.k)[0])
            for boi, z in zip(enc.boi, enc.latents, strict=True)
        ]
        return Prompt(enc.ids[:-1], patches)

    def opens_block(self, token: int) -> bool:
        return token == self.tokenizer.vocab.boi_id

    @torch.no_grad()
    def fill(self, decoder: Decoder, spans: Sequence[OpenSpan]) -> list[torch.Tensor]:
        """Denoise the spans of ``spans`` together; returns each row's clean latent (Z, h, w)."""
        shape, n = self.tokenizer.latent_shape, self.image_tokens
        leader = {s.row: i for i, s in enumerate(spans)}
        leader.update({s.guide: i for i, s in enumerate(spans) if s.guide is not None})
        members = sorted(leader)  # rows in the passes, in row order
        ids: list[list[int]] = [[] for _ in range(decoder.batch)]
        span_ids: list[list[int]] = [[] for _ in range(decoder.batch)]
        for r in members:
            ids[r], span_ids[r] = self.span_ids, [spans[leader[r]].span] * n
        passes = _passes(decoder, members, ids, span_ids)
        # one scheduler per span: diffusers' Euler scheduler counts its own steps
        scheds = [self.schedule.scheduler(self.sampler, self.settings.steps) for _ in spans]
        x = [torch.randn((1, *shape), generator=s.generator) for s in spans]
        for t in scheds[0].timesteps:
            patches = [patchify(x[leader[r]], self.k)[0] for r in members]
            out_PC = passes(patches, self.schedule.sampler_timestep(t), commit=False)
            # the model's prediction: the noise (ddpm) or the velocity (flow)
            pred = out_PC.float().cpu().view(len(members), n, -1)
            for i, s in enumerate(spans):
                e = pred[members.index(s.row)]
                if s.guide is not None:
                    u = pred[members.index(s.guide)]
                    e = u + s.scale * (e - u)
                kw = {"generator": s.generator} if self.sampler == "ddpm" else {}
                step = scheds[i].step(unpatchify(e[None], self.k, shape), t, x[i], **kw)
                x[i] = step.prev_sample
        passes([patchify(x[leader[r]], self.k)[0] for r in members], 0, commit=True)
        return [xi[0] for xi in x]

    def segments(self, ids: Sequence[int], images: Sequence[torch.Tensor]) -> list[Segment]:
        tok, vocab = self.tokenizer, self.tokenizer.vocab
        decoded = tok.vae.decode(torch.stack(list(images))) if images else []
        out: list[Segment] = []
        text: list[int] = []
        next_image = 0
        for i in ids:
            if i == vocab.boi_id:
                if text:
                    out.append(Segment(TEXT, text=tok.decode_text(text)))
                    text = []
                out.append(Segment(IMAGE, image=decoded[next_image]))
                next_image += 1
            elif i not in (tok.patch_id, vocab.eoi_id, vocab.eos_id):
                text.append(i)
        if text:
            out.append(Segment(TEXT, text=tok.decode_text(text)))
        return out

    def input_segments(self, prompt: Prompt) -> list[Segment]:
        return []  # as the former separate Transfusion generator: the prompt image is not shown


PassFn = Callable[..., torch.Tensor]


def _passes(
    decoder: Decoder, members: list[int], ids: list[list[int]], span_ids: list[list[int]]
) -> PassFn:
    """The model call of a fill's passes: ``fn(patches, timestep, commit=...)`` -> (M * n, C).

    ``patches[i]`` (n, C) are row ``members[i]``'s; the prediction holds the members' patches
    in that order. Eager: :meth:`Decoder.step` on the members' ragged ids, inputs built on the
    host. Otherwise the static span step over all B rows (the others get zero patches and sit
    the pass out), laid out once per fill; only the members' predictions come back.
    """
    n = len(ids[members[0]])
    if decoder.step_mode == "eager":

        def eager(patches, timestep, *, commit: bool) -> torch.Tensor:
            continuous = patch_inputs(members, patches, n, timestep)
            out = decoder.step(ids, commit=commit, span_ids=span_ids, **continuous)
            return out.predictions["noise_PC"]

        return eager
    block = decoder.span_block(ids, span_ids)
    rows_M = torch.tensor(members, device=decoder.device)

    def static(patches, timestep, *, commit: bool) -> torch.Tensor:
        blocks = [torch.zeros_like(patches[0])] * decoder.batch
        for r, p in zip(members, patches, strict=True):
            blocks[r] = p
        continuous = patch_inputs(range(decoder.batch), blocks, n, timestep)
        out_PC = decoder.span_step(
            block, continuous["patches_PC"], continuous["timestep_P"], commit=commit
        )
        return out_PC.reshape(decoder.batch, n, -1).index_select(0, rows_M).flatten(0, 1)

    return static


def patch_inputs(
    rows: Sequence[int],
    patches: Sequence[torch.Tensor],
    T: int,
    timestep: int | float,
    starts=None,
) -> dict[str, torch.Tensor]:
    """``Decoder.step`` inputs placing ``patches[i]`` (n, C) in row ``rows[i]`` of a T-wide step.

    Args:
        rows: the row of each patch block.
        patches: the blocks.
        T: the step's width (its longest row).
        timestep: the model's timestep input of every patch: an int (DDPM step, an int64
            tensor) or a float (flow's t * T, a float32 tensor; the sinusoidal features of an
            int and of the same value as a float are equal).
        starts: each block's first position in its row (default 0).
    """
    starts = starts if starts is not None else [0] * len(rows)
    slots = [
        r * T + s + torch.arange(p.shape[0]) for r, s, p in zip(rows, starts, patches, strict=True)
    ]
    patches_PC = torch.cat(list(patches)).float()
    value = float(timestep) if isinstance(timestep, float) else int(timestep)
    return {
        "patches_PC": patches_PC,
        "patch_slot_P": torch.cat(slots),
        "timestep_P": torch.full((patches_PC.shape[0],), value),
    }


def span_sampler_for(
    objective: Objective,
    tokenizer: MultimodalTokenizer | TransfusionTokenizer,
    model: ModelConfig,
    diffusion: DiffusionSettings | None = None,
) -> SpanSampler:
    """The span sampler of a run: diffusion on the objective's image process, or codes.

    Args:
        objective: the run's objective (``build_objective(run.objective, run.model)``).
        tokenizer: the run's tokenizer (latent with a noise schedule, else multimodal).
        model: the model config (its patch size).
        diffusion: sampling settings of continuous images (ignored for codes).
    """
    schedule = objective.noise_schedule
    if schedule is None:
        assert isinstance(tokenizer, MultimodalTokenizer), type(tokenizer)
        return CodeSpanSampler(tokenizer)
    assert not isinstance(tokenizer, MultimodalTokenizer), "diffusion needs a latent tokenizer"
    return DiffusionSpanSampler(tokenizer, model.patch_size, schedule, diffusion)
