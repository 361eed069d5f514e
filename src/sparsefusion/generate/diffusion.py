"""Sampling from a Transfusion run: text token by token, images by diffusion against the cache.

In LM mode the model samples text ids (and BOI, where the mode allows images). On BOI (or when
``text_to_image`` forces it) the sampler switches to diffusion mode (arXiv 2408.11039 section
3.3): n patches of pure noise are appended and denoised for ``steps`` passes of a diffusers
scheduler (DDPM, as the paper with 250 steps, or DDIM with fewer); every pass re-runs the image
span against the cached prefix WITHOUT committing it (``KVCache.begin(commit=False)``), and the
model only ever sees the latest x_t. Classifier-free guidance runs the unconditional branch as a
second row of the same cache, a document that opens with BOI (how the model saw images whose
caption was dropped): ``eps = eps_u + s * (eps_c - eps_u)``. The clean latent is then committed
once at t = 0, EOI is appended, and text sampling continues. Images decode through the run's VAE.

Captioning (``image_to_text``) encodes the prompt image with the VAE and prefills its clean
patches (t = 0) before sampling text.

Shape legend: Z/h/w = latent channels and side, n = patches per image, C = values per patch,
V = vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparsefusion.data.documents import IMAGE, TEXT, Document
from sparsefusion.data.documents import Segment as DocSegment
from sparsefusion.generate.engine import Decoder, MissingAuxRouters, _advance, aux_router_message
from sparsefusion.generate.output import Sample, Segment
from sparsefusion.generate.request import GenerationRequest
from sparsefusion.generate.sampling import pick, process_logits, row_generator
from sparsefusion.models.transformer import ModelOutput, Transformer
from sparsefusion.nn.patch_embed import patchify, unpatchify
from sparsefusion.nn.routing_context import AuxRouterLookup

TF_MODES = ("text", "text_to_image", "image_to_text", "interleaved")


@dataclass
class DiffusionSettings:
    """How images are sampled.

    Attributes:
        steps: denoising passes per image (the paper evaluates DDPM with 250).
        sampler: "ddim" (deterministic, good with few steps) or "ddpm" (ancestral).
        max_images: most images one sample may emit in LM mode (``text``/``interleaved``).
    """

    steps: int = 50
    sampler: str = "ddim"
    max_images: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"diffusion steps must be >= 1, got {self.steps}")
        if self.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {self.sampler!r}")


def make_scheduler(sampler: str, num_train_timesteps: int, beta_schedule: str, steps: int):
    """A diffusers scheduler on the training schedule, set to ``steps`` passes."""
    from sparsefusion.tokenizers.image_vae import require_diffusers

    diffusers = require_diffusers()
    cls = diffusers.DDIMScheduler if sampler == "ddim" else diffusers.DDPMScheduler
    sched = cls(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        clip_sample=False,
        prediction_type="epsilon",
    )
    sched.set_timesteps(steps)
    return sched


class LatentDecoder(Decoder):
    """A :class:`Decoder` whose steps may carry continuous image patches."""

    @torch.no_grad()
    def run(
        self,
        new_ids: Sequence[Sequence[int]],
        *,
        commit: bool,
        span_ids: Sequence[Sequence[int]] | None = None,
        patches: Sequence[torch.Tensor | None] = (),
        timestep: int = 0,
        patch_start: Sequence[int] = (),
    ) -> ModelOutput:
        """Append ``new_ids`` (row b's ``patches[b]`` fill its ids from ``patch_start[b]``)."""
        inputs = self._inputs(new_ids, span_ids)
        T = inputs.tokens_BT.shape[1]
        rows = [(b, p) for b, p in enumerate(patches) if p is not None]
        if rows:
            inputs.patches_PC = torch.cat([p for _, p in rows]).float()
            inputs.patch_slot_P = torch.cat(
                [b * T + patch_start[b] + torch.arange(p.shape[0]) for b, p in rows]
            )
            inputs.timestep_P = torch.full((inputs.patches_PC.shape[0],), int(timestep))
        self.cache.begin([len(ids) for ids in new_ids], commit=commit)
        out = self.model(inputs.to(self.device), self.context(self.cache))
        if commit:
            for row, ids in zip(self.rows, new_ids, strict=True):
                _advance(row, ids, self.vocab.eos_id)
        return out


class TransfusionGenerator:
    """The ``Generator`` API for a run trained with ``objective.name=transfusion``.

    Args:
        model: the trained model (``model.cfg.latent_channels > 0``).
        tokenizer: the run's :class:`~sparsefusion.tokenizers.transfusion.TransfusionTokenizer`.
        aux_routers: auxiliary routers (required with batch-routed sites).
        schedule: ``(num_train_timesteps, beta_schedule)`` of the run's objective.
        run_dir: named in messages.
        settings: steps and sampler of the image spans.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer,
        aux_routers: AuxRouterLookup | None = None,
        *,
        schedule: tuple[int, str] = (1000, "squaredcos_cap_v2"),
        run_dir: str = "RUN_DIR",
        settings: DiffusionSettings | None = None,
    ):
        if model.router_sites() and aux_routers is None:
            raise MissingAuxRouters(aux_router_message(run_dir, list(model.router_sites())))
        self.model, self.tokenizer, self.aux_routers = model.eval(), tokenizer, aux_routers
        self.schedule, self.run_dir = schedule, run_dir
        self.settings = settings or DiffusionSettings()
        self.k = model.cfg.patch_size
        self.n = tokenizer.patches_per_image(self.k)
        self.vocab = tokenizer.vocab
        self.run_config = None  # the run's TrainConfig (set by transfusion_generator)
        self.checkpoint = None

    # ---- what the run serves (the Generator protocol used by GenerationRequest.validate) ----

    @property
    def modes(self) -> list[str]:
        return list(TF_MODES)

    def why_not(self, mode: str) -> str:
        return "" if mode in TF_MODES else "a Transfusion run serves text and images only"

    @property
    def max_len(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def vocab_width(self) -> int:
        return self.model.cfg.vocab_size

    def min_new_tokens(self, mode: str) -> int:
        return self.n + 2 if mode == "text_to_image" else 1

    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        return self._prompt(req)[0]

    def _prompt(self, req: GenerationRequest) -> tuple[list[int], list[torch.Tensor], list[int]]:
        doc = req.document if req.document is not None else self._prompt_document(req)
        if not doc.segments:
            return [self.vocab.bos_id], [], []
        (enc,) = self.tokenizer.encode_latent_documents([doc], self.k)
        return enc.ids[:-1], enc.latents, enc.boi

    def _prompt_document(self, req: GenerationRequest) -> Document:
        segments = []
        if req.mode == "image_to_text":
            from PIL import Image

            from sparsefusion.data.images import read_image

            size = self.tokenizer.vae.cfg.image_size
            image = req.image
            if not isinstance(image, Image.Image):
                image = read_image(image, f"image {image}", size)
            segments.append(DocSegment(IMAGE, image))
        if req.prompt:
            segments.append(DocSegment(TEXT, req.prompt))
        return Document(segments=segments)

    # ---- generation -----------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Sample]:
        """One Sample per (request, sample index), deterministic per seed."""
        prompts = [req.validate(self) for req in requests]
        samples = []
        for r, (req, prompt_ids) in enumerate(zip(requests, prompts, strict=True)):
            for i in range(req.num_samples):
                start = time.perf_counter()
                new, latents = self.sample_one(req, row_generator(req.seed, i))
                samples.append(
                    Sample(
                        segments=self._segments(new, latents),
                        token_ids=new,
                        new_tokens=len(new),
                        seconds=time.perf_counter() - start,
                        prompt=req.prompt,
                        mode=req.mode,
                        request=r,
                        index=i,
                        prompt_ids=prompt_ids,
                    )
                )
        return samples

    def sample_one(
        self, req: GenerationRequest, gen: torch.Generator
    ) -> tuple[list[int], list[torch.Tensor]]:
        """New ids of one sample (patch positions hold the image id) and its image latents."""
        ids, prompt_latents, boi = self._prompt(req)
        guided = req.cfg_scale != 1.0 and req.mode == "text_to_image"
        budget = min(req.max_new_tokens, self.max_len - len(ids))
        rows = [ids, [self.vocab.bos_id]] if guided else [ids]
        dec = LatentDecoder(
            self.model, self.vocab, batch=len(rows), capacity=len(ids) + budget,
            aux_routers=self.aux_routers, run_dir=self.run_dir,
        )  # fmt: skip
        patches = [self._clean_prompt_patches(ids, prompt_latents, boi)] + [None] * (len(rows) - 1)
        starts = [boi[0] + 1 if boi else 0] + [0] * (len(rows) - 1)
        spans = [self._prompt_spans(ids, boi)] + [[-1] for _ in rows[1:]]
        out = dec.run(rows, commit=True, span_ids=spans, patches=patches, patch_start=starts)
        logits = [dec.last_logits(out.logits_BTV, rows)[b] for b in range(len(rows))]
        new: list[int] = []
        latents: list[torch.Tensor] = []
        force_image = req.mode == "text_to_image"
        while len(new) < budget:
            room = budget - len(new)
            if force_image:
                token = self.vocab.boi_id
            else:
                allowed = self._allowed(req.mode, room, len(latents))
                params = req.sampling()
                token = pick(process_logits(logits[0], params, allowed, new), params, gen)
            if token == self.vocab.boi_id:
                x, logits = self._image(dec, req, gen, span=len(boi) + len(latents))
                latents.append(x)
                new += [self.vocab.boi_id, *([self.tokenizer.patch_id] * self.n), self.vocab.eoi_id]
                if force_image:
                    break
                continue
            new.append(token)
            if token == self.vocab.eos_id or token in req.stop_ids:
                break
            out = dec.run([[token]] + [[] for _ in rows[1:]], commit=True)
            logits = [out.logits_BTV[0, 0]]
        return new, latents

    def _image(self, dec: LatentDecoder, req, gen, span: int):
        """BOI, the denoising loop (uncommitted), the clean commit and EOI; returns x_0."""
        R, n = len(dec.rows), self.n
        dec.run([[self.vocab.boi_id]] * R, commit=True)
        sched = make_scheduler(self.settings.sampler, *self.schedule, self.settings.steps)
        shape = self.tokenizer.latent_shape
        x = torch.randn((1, *shape), generator=gen)
        patch_ids = [[self.tokenizer.patch_id] * n] * R
        spans = [[span] * n] * R
        for t in sched.timesteps:
            p = patchify(x, self.k)[0]
            out = dec.run(patch_ids, commit=False, span_ids=spans, patches=[p] * R,
                          timestep=int(t), patch_start=[0] * R)  # fmt: skip
            eps = out.predictions["noise_PC"].float().cpu().view(R, n, -1)
            e = eps[0] if R == 1 else eps[1] + req.cfg_scale * (eps[0] - eps[1])
            step_kw = {"generator": gen} if self.settings.sampler == "ddpm" else {}
            x = sched.step(unpatchify(e[None], self.k, shape), t, x, **step_kw).prev_sample
        clean = patchify(x, self.k)[0]
        dec.run(patch_ids, commit=True, span_ids=spans, patches=[clean] * R, patch_start=[0] * R)
        out = dec.run([[self.vocab.eoi_id]] * R, commit=True)
        return x[0], [out.logits_BTV[0, 0]]

    def _allowed(self, mode: str, room: int, images: int) -> torch.Tensor:
        """Text ids and EOS; BOI where images are allowed and fit."""
        allowed = torch.zeros(self.vocab_width, dtype=torch.bool)
        lo = self.vocab.offset(TEXT)
        allowed[lo : lo + self.vocab.modality_sizes[TEXT]] = True
        allowed[self.vocab.eos_id] = True
        can_image = mode in ("text", "interleaved") and images < self.settings.max_images
        if can_image and room >= self.n + 2:
            allowed[self.vocab.boi_id] = True
        return allowed

    def _clean_prompt_patches(self, ids, latents, boi) -> torch.Tensor | None:
        if not latents:
            return None
        if len(latents) > 1:
            raise ValueError("a Transfusion prompt may hold one image")
        return patchify(latents[0][None].float(), self.k)[0]

    def _prompt_spans(self, ids: list[int], boi: list[int]) -> list[int]:
        spans = [-1] * len(ids)
        for j, b in enumerate(boi):
            spans[b + 1 : b + 1 + self.n] = [j] * self.n
        return spans

    def _segments(self, ids: list[int], latents: list[torch.Tensor]) -> list[Segment]:
        out: list[Segment] = []
        images = self.tokenizer.vae.decode(torch.stack(latents)) if latents else []
        text: list[int] = []
        next_image = 0
        for i in ids:
            if i == self.vocab.boi_id:
                if text:
                    out.append(Segment(TEXT, text=self.tokenizer.decode_text(text)))
                    text = []
                out.append(Segment(IMAGE, image=images[next_image]))
                next_image += 1
            elif i not in (self.tokenizer.patch_id, self.vocab.eoi_id, self.vocab.eos_id):
                text.append(i)
        if text:
            out.append(Segment(TEXT, text=self.tokenizer.decode_text(text)))
        return out


def transfusion_generator(run, run_dir) -> TransfusionGenerator:
    """The generator of a loaded Transfusion run (``generate/run.py: load_run``)."""
    from sparsefusion.config import load_yaml

    objective = load_yaml(f"{run_dir}/config.yaml").get("objective", {})
    schedule = (
        int(objective.get("num_train_timesteps", 1000)),
        str(objective.get("beta_schedule", "squaredcos_cap_v2")),
    )
    gen = TransfusionGenerator(
        run.model, run.tokenizer, run.aux_routers, schedule=schedule, run_dir=str(run_dir)
    )
    gen.run_config, gen.checkpoint = getattr(run, "config", None), run.checkpoint
    return gen
