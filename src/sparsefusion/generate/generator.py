"""The Python API: ``Generator.from_run(run_dir).generate([GenerationRequest(...)])``.

Every request is validated (and its prompt encoded) before any model work; then all samples of
all requests decode as one batch (each sample is a row; a guided sample adds its unconditional
row, a document that opens with BOI, as the model saw images without a caption) and are
decoded back to text, images and speech by the run's tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from sparsefusion.generate.decode import RowSpec, capacity_for, decode
from sparsefusion.generate.engine import Decoder, MissingAuxRouters, aux_router_message
from sparsefusion.generate.output import Sample, Segment
from sparsefusion.generate.request import GUIDED_MODES, GenerationRequest
from sparsefusion.generate.sampling import row_generator
from sparsefusion.models.transformer import Transformer
from sparsefusion.nn.routing_context import AuxRouterLookup
from sparsefusion.tokenizers.multimodal import MultimodalTokenizer


class Generator:
    """Samples from a trained model through its tokenizer.

    Args:
        model: the trained model.
        tokenizer: the run's tokenizer.
        aux_routers: the run's auxiliary routers (required with batch-routed sites).
        run_dir: named in messages.
        max_speech_units: longest speech span a sample may emit.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: MultimodalTokenizer,
        aux_routers: AuxRouterLookup | None = None,
        *,
        run_dir: str = "RUN_DIR",
        max_speech_units: int = 256,
    ):
        if model.router_sites() and aux_routers is None:
            raise MissingAuxRouters(aux_router_message(run_dir, list(model.router_sites())))
        self.model, self.tokenizer, self.aux_routers = model.eval(), tokenizer, aux_routers
        self.run_dir = run_dir
        self.run_config: Any = None  # the run's TrainConfig (set by from_run)
        self.checkpoint: Path | None = None
        has_image = IMAGE in model.cfg.modalities
        has_speech = tokenizer.speech is not None and SPEECH in model.cfg.modalities
        self.rules = SpanRules(
            tokenizer.vocab,
            model.cfg.vocab_size,
            image_tokens=tokenizer.image.tokens_per_image if has_image else 0,
            max_speech_units=max_speech_units if has_speech else 0,
        )

    @classmethod
    def from_run(
        cls, run_dir: str | Path, checkpoint: int | None = None, device: str = "cpu"
    ) -> Generator:
        """Load a run folder's newest (or ``checkpoint``-step) model, tokenizer, aux routers."""
        from sparsefusion.generate.run import load_run

        run = load_run(run_dir, checkpoint, device)
        if run.model.cfg.latent_channels:  # the Transfusion setting: images by diffusion
            from sparsefusion.generate.diffusion import transfusion_generator

            return transfusion_generator(run, run_dir)  # type: ignore[return-value]
        gen = cls(
            run.model,
            run.tokenizer,
            run.aux_routers,
            run_dir=str(run_dir),
            max_speech_units=run.max_speech_units,
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
        doc = req.document if req.document is not None else self._prompt_document(req)
        if not doc.segments:
            return [self.tokenizer.vocab.bos_id]
        ids, _ = self.tokenizer.encode_document(doc)
        return ids[:-1]  # drop EOS: the model continues the document

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

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Sample]:
        """One Sample per (request, sample index), in order; deterministic per seed."""
        if not requests:
            return []
        prompts = [req.validate(self) for req in requests]  # every check before model work
        rows, owners = self._rows(requests, prompts)
        decoder = Decoder(
            self.model,
            self.tokenizer.vocab,
            batch=len(rows),
            capacity=capacity_for(rows),
            aux_routers=self.aux_routers,
            run_dir=self.run_dir,
        )
        result = decode(decoder, rows)
        samples = []
        for (r, i), row_index in owners.items():
            req, new = requests[r], result.new_ids[row_index]
            samples.append(
                Sample(
                    segments=self.segments(new),
                    token_ids=list(new),
                    new_tokens=len(new),
                    seconds=result.seconds,
                    prompt=req.prompt,
                    mode=req.mode,
                    request=r,
                    index=i,
                    prompt_ids=prompts[r],
                    prompt_segments=self._input_segments(prompts[r]),
                )
            )
        return samples

    def _rows(self, requests, prompts) -> tuple[list[RowSpec], dict[tuple[int, int], int]]:
        rows: list[RowSpec] = []
        owners: dict[tuple[int, int], int] = {}
        for r, (req, prompt) in enumerate(zip(requests, prompts, strict=True)):
            budget = min(req.max_new_tokens, self.max_len - len(prompt))
            for i in range(req.num_samples):
                owners[(r, i)] = len(rows)
                rows.append(self._row(req, prompt, budget, i))
                if req.cfg_scale != 1.0 and req.mode in GUIDED_MODES:
                    uncond = self._row(req, [self.tokenizer.vocab.bos_id], budget, i)
                    uncond.follower = True
                    rows[-1].guide, rows[-1].scale = len(rows), req.cfg_scale
                    rows.append(uncond)
        return rows, owners

    def _row(self, req: GenerationRequest, prompt: list[int], budget: int, i: int) -> RowSpec:
        return RowSpec(
            prompt=list(prompt),
            constraint=RowConstraint(self.rules, req.mode, budget),
            params=req.sampling(),
            generator=row_generator(req.seed, i),
            opening=self.rules.opening(req.mode),
            stop_ids=frozenset(req.stop_ids),
        )

    def segments(self, ids: Sequence[int]) -> list[Segment]:
        """Decode unified ids into text / image / speech segments."""
        out = []
        for seg in self.tokenizer.decode(list(ids)):
            if seg.modality == TEXT:
                out.append(Segment(TEXT, text=seg.payload))
            elif seg.modality == IMAGE:
                out.append(Segment(IMAGE, image=seg.payload))
            else:
                wave = torch.as_tensor(seg.payload).detach().float().cpu().numpy()
                out.append(Segment(SPEECH, audio=wave, sample_rate=_rate()))
        return out

    def _input_segments(self, prompt: list[int]) -> list[Segment]:
        """The prompt's images and speech (shown next to a caption or a transcript)."""
        vocab = self.tokenizer.vocab
        if vocab.boi_id not in prompt and vocab.boa_id not in prompt:
            return []
        return [s for s in self.segments(prompt) if s.modality != TEXT]


def _audio(audio) -> torch.Tensor:
    from sparsefusion.data.audio import read_wav

    if isinstance(audio, torch.Tensor):
        return audio.float().reshape(-1)
    return read_wav(audio, f"audio {audio}")


def _rate() -> int:
    from sparsefusion.data.audio import SAMPLE_RATE

    return SAMPLE_RATE
