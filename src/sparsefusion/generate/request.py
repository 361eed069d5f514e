"""What a user asks for: :class:`GenerationRequest`, validated before any model work."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparsefusion.data.text import text_problem
from sparsefusion.generate.constraints import MODES
from sparsefusion.generate.sampling import SamplingParams, sampling_problems

if TYPE_CHECKING:
    from sparsefusion.generate.generator import Generator
    from sparsefusion.generate.span_samplers import Prompt

GUIDED_MODES = ("text_to_image", "text_to_speech")
MAX_NUM_SAMPLES = 64  # default bound on one request's num_samples (--max-samples)
MAX_SEED = 2**62  # sample i draws from seed + i: stays inside torch's 64-bit seeds
MAX_TOTAL_SAMPLES = 1024  # default bound on the samples of one generate call (--max-total-samples)


@dataclass
class GenerationRequest:
    """One prompt and how to sample from it.

    Attributes:
        prompt: the text prompt (the caption for ``text_to_image``, a question or nothing for
            ``image_to_text``).
        mode: one of ``text``, ``text_to_image``, ``image_to_text``, ``text_to_speech``,
            ``speech_to_text``, ``interleaved``.
        image: the image to caption (a path or a PIL image) for ``image_to_text``.
        audio: the speech to transcribe (a WAV path or a waveform tensor) for ``speech_to_text``.
        document: a whole prompt document (segments in order; e.g. a line of a prompts file);
            when set it replaces ``prompt``, ``image`` and ``audio``.
        num_samples: samples to draw (sample i uses the stream of ``seed`` and i).
        max_new_tokens: most tokens to generate per sample (forced ones included).
        temperature: 0 = greedy.
        top_k: 0 = off.
        top_p: 1 = off.
        repetition_penalty: 1 = off.
        cfg_scale: classifier-free guidance scale of image/speech spans (``text_to_image``,
            ``text_to_speech``); 1 = plain sampling.
        seed: random seed.
        stop_ids: extra unified-vocabulary ids that end a sample.
        where: where the request came from (e.g. ``prompts.jsonl:3``), named in errors.
        max_num_samples: the largest ``num_samples`` accepted (``generate --max-samples``; a
            prompts line cannot set it): every sample is a row of one decoding batch.
    """

    prompt: str = ""
    mode: str = "text"
    image: Any = None
    audio: Any = None
    document: Any = None
    num_samples: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    cfg_scale: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = field(default_factory=tuple)
    where: str = ""
    max_num_samples: int = MAX_NUM_SAMPLES

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
        )

    def validate(self, gen: Generator) -> list[int]:
        """Raise ValueError naming the field (and ``where``) for bad input; return prompt ids.

        Reads and encodes the prompt's image or audio; runs no model.
        """
        return self.encode(gen).ids

    def encode(self, gen: Generator) -> Prompt:
        """:meth:`validate`, returning the whole encoded prompt (continuous inputs too)."""
        where = f"{self.where}: " if self.where else ""
        for problem in self._field_problems(gen):
            raise ValueError(where + problem)
        try:
            prompt = gen.encode_prompt(self)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from e
        limit, n = gen.max_len, len(prompt.ids)
        need = gen.min_new_tokens(self.mode)
        if n + need > limit:
            raise ValueError(
                f"{where}prompt is {n} tokens; with the {need} new token(s) mode "
                f"{self.mode!r} needs that exceeds the model's max length {limit}"
            )
        return prompt

    def _field_problems(self, gen: Generator) -> list[str]:
        out = []
        if self.mode not in MODES:
            return [f"mode must be one of {list(MODES)}, got {self.mode!r}"]
        if self.mode not in gen.modes:
            out.append(
                f"mode {self.mode!r} is not served by this run ({gen.why_not(self.mode)}); "
                f"it serves {gen.modes}"
            )
        n = self.num_samples
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.max_num_samples:
            out.append(
                f"num_samples must be an int in [1, {self.max_num_samples}] (raise the bound "
                f"with --max-samples), got {n!r}"
            )
        seed = self.seed
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            out.append(f"seed must be an int in [0, {MAX_SEED}], got {seed!r}")
        if not isinstance(self.prompt, str):
            out.append(f"prompt must be a string, got {type(self.prompt).__name__}")
        elif (problem := text_problem(self.prompt)) is not None:
            out.append(f"prompt: {problem}")
        need = gen.min_new_tokens(self.mode)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < need:
            out.append(
                f"max_new_tokens must be >= {need} for mode {self.mode!r}, "
                f"got {self.max_new_tokens!r}"
            )
        out += sampling_problems(self.temperature, self.top_k, self.top_p, self.repetition_penalty)
        if not self.cfg_scale > 0:
            out.append(f"cfg_scale must be > 0 (1 = no guidance), got {self.cfg_scale}")
        elif self.cfg_scale != 1.0 and self.mode not in GUIDED_MODES:
            out.append(f"cfg_scale applies to modes {GUIDED_MODES}, not {self.mode!r}")
        bad_stop = [i for i in self.stop_ids if not 0 <= i < gen.vocab_width]
        if bad_stop:
            out.append(f"stop_ids {bad_stop} are outside the vocabulary [0, {gen.vocab_width})")
        if self.document is None:
            if self.mode == "image_to_text" and self.image is None:
                out.append("mode 'image_to_text' needs an image (--image PATH)")
            if self.mode == "speech_to_text" and self.audio is None:
                out.append("mode 'speech_to_text' needs audio (--audio PATH)")
            for name in ("image", "audio"):
                value = getattr(self, name)
                if isinstance(value, (str, Path)) and not Path(value).is_file():
                    out.append(f"{name} file {str(value)!r} does not exist")
        return out
