"""Constrained mixed-modal decoding: which unified-vocabulary ids a row may emit next.

A small state machine per row (Chameleon-style text/image switching):

- text: text ids and EOS (plus, in ``interleaved`` mode, BOI / BOA when the row has room to
  finish the span: BOI + L codes + EOI, or BOA + ``MIN_SPEECH_UNITS`` units + EOA; the span
  sampler may allow BOI in more modes and cap the images of a row);
- image (after BOI): exactly the L ids of an image span, then EOI is forced;
- speech (after BOA): speech units until EOA (allowed after ``MIN_SPEECH_UNITS`` units: one
  unit decodes to no samples; forced at the unit limit or when one token of budget is left).

Modes: ``text`` (continuation), ``text_to_image`` (BOI forced after the prompt, done at EOI),
``image_to_text`` (captioning; the prompt holds the image), ``text_to_speech`` (BOA forced, done
at EOA), ``speech_to_text`` and ``interleaved`` (the model decides; done at EOS).

Shape legend: V = vocabulary (the model's logits width, padded ids never allowed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsefusion.tokenizers.vocab import UnifiedVocab

MODES = (
    "text",
    "text_to_image",
    "image_to_text",
    "text_to_speech",
    "speech_to_text",
    "interleaved",
)
NEEDS_IMAGE = ("text_to_image", "image_to_text")
NEEDS_SPEECH = ("text_to_speech", "speech_to_text")
MIN_SPEECH_UNITS = 2


@dataclass
class SpanRules:
    """Id sets of a run's vocabulary.

    Attributes:
        vocab: the unified vocabulary.
        width: logits width V (>= vocab size).
        image_tokens: ids per image span L (0: the run has no images).
        max_speech_units: longest speech span (0: the run has no speech).
        image_modes: modes in which a row may open an image span itself (BOI).
        max_images: most image spans a row may open itself (None: no limit).
    """

    vocab: UnifiedVocab
    width: int
    image_tokens: int = 0
    max_speech_units: int = 0
    image_modes: tuple[str, ...] = ("interleaved",)
    max_images: int | None = None
    _masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        v = self.vocab
        self._masks["text"] = self._range("text")
        self._masks["text"][v.eos_id] = True
        self._masks["image"] = self._range("image") if self.image_tokens else self._none()
        self._masks["speech"] = self._range("speech") if self.max_speech_units else self._none()
        for name, i in (("eoi", v.eoi_id), ("eoa", v.eoa_id), ("boi", v.boi_id), ("boa", v.boa_id)):
            self._masks[name] = self._none()
            self._masks[name][i] = True

    def mask(self, *names: str) -> torch.Tensor:
        """The union of the named id sets (kept: a decode step stacks these, never builds them)."""
        key = "|".join(names)
        if key not in self._masks:
            out = self._none()
            for name in names:
                out = out | self._masks[name]
            self._masks[key] = out
        return self._masks[key]

    def _none(self) -> torch.Tensor:
        return torch.zeros(self.width, dtype=torch.bool)

    def _range(self, modality: str) -> torch.Tensor:
        m = self._none()
        if modality in self.vocab.modalities:
            lo = self.vocab.offset(modality)
            m[lo : lo + self.vocab.modality_sizes[modality]] = True
        return m

    def opening(self, mode: str) -> list[int]:
        """Ids forced right after the prompt."""
        if mode == "text_to_image":
            return [self.vocab.boi_id]
        if mode == "text_to_speech":
            return [self.vocab.boa_id]
        return []


class RowConstraint:
    """The state machine of one row (see the module doc).

    Args:
        rules: the vocabulary's id sets.
        mode: one of ``MODES``.
        budget: new tokens this row may still emit (forced ones included).
    """

    def __init__(self, rules: SpanRules, mode: str, budget: int):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.rules, self.mode, self.budget = rules, mode, budget
        self.state = "text"
        self.in_span = 0
        self.images = 0  # image spans opened so far
        self.done = budget <= 0

    @property
    def in_guided_span(self) -> bool:
        """Inside an image or speech span (where classifier-free guidance applies)."""
        return self.state in ("image", "speech")

    def allowed(self) -> torch.Tensor:
        """Bool (V,) of the ids this row may emit next."""
        r = self.rules
        if self.state == "image":
            return r.mask("eoi") if self.in_span >= r.image_tokens else r.mask("image")
        if self.state == "speech":
            enough = self.in_span >= min(MIN_SPEECH_UNITS, r.max_speech_units)
            if self.in_span >= r.max_speech_units or (enough and self.budget <= 1):
                return r.mask("eoa")
            return r.mask("speech", "eoa") if enough else r.mask("speech")
        names = ["text"]
        more_images = r.max_images is None or self.images < r.max_images
        if self.mode in r.image_modes and more_images:
            if r.image_tokens and self.budget >= r.image_tokens + 2:
                names.append("boi")
        if self.mode == "interleaved":
            if r.max_speech_units and self.budget >= MIN_SPEECH_UNITS + 2:
                names.append("boa")
        return r.mask(*names)

    def advance(self, token: int, *, forced: bool = False) -> None:
        """Record an emitted id (it must be allowed, unless ``forced``: a mode's opening id)."""
        if self.done:
            raise ValueError("advance() on a finished row")
        if not forced and not bool(self.allowed()[token]):
            raise ValueError(f"id {token} is not allowed in state {self.state!r}")
        v = self.rules.vocab
        self.budget -= 1
        if self.state == "text":
            if token == v.eos_id:
                self.done = True
            elif token in (v.boi_id, v.boa_id):
                self.state = "image" if token == v.boi_id else "speech"
                self.in_span = 0
                self.images += token == v.boi_id
        elif token in (v.eoi_id, v.eoa_id):
            self.state = "text"
            self.done = self.done or self.mode in ("text_to_image", "text_to_speech")
        else:
            self.in_span += 1
        if self.budget <= 0:
            self.done = True
