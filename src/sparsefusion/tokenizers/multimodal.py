"""Documents <-> unified-vocabulary id streams (text BPE + image VQ + speech units + sentinels).

A document becomes ``[BOS] seg_1 seg_2 ... [EOS]`` where a text segment is its BPE ids, an
image segment is ``[BOI] code_1 .. code_L [EOI]`` and a speech segment (only when the tokenizer
has a speech unit tokenizer) is ``[BOA] unit_1 .. unit_F [EOA]`` (F varies with the clip length).
Sentinels are text-modality positions (see ``vocab.py`` for the sentinel and loss rule). Saved
tokenizers carry a manifest of SHA-256 hashes; loading verifies it and raises
:class:`TokenizerCacheError` on any mismatch or corruption.

Shape legend: N = images, L = codes per image, F = speech units of a clip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image

from sparsefusion.data.documents import IMAGE, SPEECH, TEXT, Document, Segment
from sparsefusion.models.transformer import ModelConfig
from sparsefusion.tokenizers.image_vq import VQImageTokenizer
from sparsefusion.tokenizers.manifest import read_manifest, verify_files, write_manifest
from sparsefusion.tokenizers.speech_units import SpeechUnitTokenizer
from sparsefusion.tokenizers.text_bpe import BPETextTokenizer
from sparsefusion.tokenizers.vocab import UnifiedVocab

FILES = ("text.json", "image_vq.safetensors", "image_vq.json", "vocab.json")
SPEECH_FILES = ("speech_units.safetensors", "speech_units.json")
FORMAT_VERSION = 1


class TokenizerCacheError(RuntimeError):
    """A saved tokenizer directory is missing files, corrupt, or inconsistent."""


class MultimodalTokenizer:
    """Encode documents into one id stream and decode id streams back into segments.

    Args:
        text: the text BPE.
        image: the image VQ tokenizer.
        vocab: the unified vocabulary; its sizes must match the tokenizers.
        speech: the speech unit tokenizer (then the vocab must have a ``speech`` modality).
    """

    def __init__(
        self,
        text: BPETextTokenizer,
        image: VQImageTokenizer,
        vocab: UnifiedVocab,
        speech: SpeechUnitTokenizer | None = None,
    ) -> None:
        expected = {TEXT: text.vocab_size, IMAGE: image.codebook_size}
        if speech is not None:
            expected[SPEECH] = speech.codebook_size
        if list(vocab.modalities) != list(expected):
            raise ValueError(f"vocab modalities {vocab.modalities} != tokenizers {list(expected)}")
        for name, n in expected.items():
            if vocab.modality_sizes.get(name) != n:
                raise ValueError(
                    f"vocab size of {name!r} is {vocab.modality_sizes.get(name)}, tokenizer has {n}"
                )
        self.text = text
        self.image = image
        self.vocab = vocab
        self._text_off = vocab.offset(TEXT)
        self._image_off = vocab.offset(IMAGE)
        self._image_idx = vocab.modality_index(IMAGE)
        self.speech = speech
        if speech is not None:
            self._speech_off = vocab.offset(SPEECH)
            self._speech_idx = vocab.modality_index(SPEECH)

    @property
    def modalities(self) -> list[str]:
        """Modality names in index order (0 = text)."""
        return list(self.vocab.modalities)

    def bind_model(self, model: ModelConfig) -> ModelConfig:
        """The model config unchanged: discrete codes depend on no model setting (the
        vocabulary size is filled by the trainer)."""
        return model

    def describe_image(self) -> str:
        """One line on how an image is encoded (``sparsefusion tokenizer inspect``)."""
        return f"{self.image.tokens_per_image} codes per {self.image.cfg.image_size}px image"

    # ---- encoding -----------------------------------------------------------------------------

    def encode_document(self, doc: Document) -> tuple[list[int], list[int]]:
        """One document -> (global ids, modality index per id).

        Raises:
            ValueError: on a segment modality this tokenizer does not have.
        """
        return self.encode_documents([doc])[0]

    def encode_documents(self, docs: list[Document]) -> list[tuple[list[int], list[int]]]:
        """Many documents; all images of all documents go through one batched VQ call."""
        images: list[Image.Image] = []
        texts: list[str] = []
        clips: list[torch.Tensor] = []
        for doc in docs:
            for seg in doc.segments:
                if seg.modality == IMAGE:
                    images.append(seg.payload)
                elif seg.modality == TEXT:
                    texts.append(seg.payload)
                elif seg.modality == SPEECH and self.speech is not None:
                    clips.append(seg.payload)
                else:
                    raise ValueError(
                        f"cannot tokenize segment modality {seg.modality!r}; "
                        f"supported: {self.modalities}"
                    )
        codes_NL = self.image.encode(images) + self._image_off
        code_rows = codes_NL.tolist()
        text_rows = [[i + self._text_off for i in t] for t in self.text.encode_batch(texts)]
        unit_rows = self.speech.encode(clips) if clips else []
        out, next_image, next_text, next_clip = [], 0, 0, 0
        for doc in docs:
            ids, mods = [self.vocab.bos_id], [0]
            for seg in doc.segments:
                if seg.modality == TEXT:
                    t = text_rows[next_text]
                    next_text += 1
                    ids += t
                    mods += [0] * len(t)
                elif seg.modality == SPEECH:
                    units = [u + self._speech_off for u in unit_rows[next_clip]]
                    next_clip += 1
                    ids += [self.vocab.boa_id, *units, self.vocab.eoa_id]
                    mods += [0, *([self._speech_idx] * len(units)), 0]
                else:
                    codes = code_rows[next_image]
                    next_image += 1
                    ids += [self.vocab.boi_id, *codes, self.vocab.eoi_id]
                    mods += [0, *([self._image_idx] * len(codes)), 0]
            ids.append(self.vocab.eos_id)
            mods.append(0)
            out.append((ids, mods))
        return out

    # ---- decoding -----------------------------------------------------------------------------

    def decode(self, ids: list[int]) -> list[Segment]:
        """Global ids -> text, image (and speech) segments, split at BOI/EOI (BOA/EOA).

        Special tokens other than BOI/EOI end the current text segment and are dropped. An image
        span ends at EOI, at any non-image id (missing EOI) or at the end of ``ids``; a span with
        too few codes is padded by repeating its last code, one with too many is truncated, an
        empty span is dropped. Image ids outside a span are dropped. A speech span ends at EOA or at
        any non-unit id and is decoded to a waveform. Never raises on bad spans.
        """
        vocab, L = self.vocab, self.image.tokens_per_image
        text_lo, text_hi = self._text_off, self._text_off + self.text.vocab_size
        img_lo, img_hi = self._image_off, self._image_off + self.image.codebook_size
        sp_lo = self._speech_off if self.speech is not None else -1
        sp_hi = sp_lo + self.speech.codebook_size if self.speech is not None else -1
        parts: list[tuple[str, list[int]]] = []  # (modality, local ids) in reading order
        text_buf: list[int] = []
        span: list[int] | None = None
        audio: list[int] | None = None

        def flush_text() -> None:
            if text_buf:
                parts.append((TEXT, text_buf.copy()))
                text_buf.clear()

        def close_span() -> None:
            if span:
                parts.append((IMAGE, (span + [span[-1]] * L)[:L]))

        for i in ids:
            if audio is not None:
                if sp_lo <= i < sp_hi:
                    audio.append(i - sp_lo)
                    continue
                if audio:
                    parts.append((SPEECH, audio))
                audio = None
                if i == vocab.eoa_id:
                    continue
            if span is not None:
                if img_lo <= i < img_hi:
                    span.append(i - img_lo)
                    continue
                close_span()
                span = None
                if i == vocab.eoi_id:
                    continue
            if i == vocab.boi_id:
                flush_text()
                span = []
            elif i == vocab.boa_id and self.speech is not None:
                flush_text()
                audio = []
            elif text_lo <= i < text_hi:
                text_buf.append(i - text_lo)
            elif i < text_lo:
                flush_text()
        if span is not None:
            close_span()
        if audio:
            parts.append((SPEECH, audio))
        flush_text()
        return self._render(parts)

    def _render(self, parts: list[tuple[str, list[int]]]) -> list[Segment]:
        codes = [p for m, p in parts if m == IMAGE]
        images = self.image.decode(torch.tensor(codes, dtype=torch.long)) if codes else []
        segments, next_image = [], 0
        for modality, local in parts:
            if modality == TEXT:
                segments.append(Segment(TEXT, self.text.decode(local)))
            elif modality == SPEECH:
                segments.append(Segment(SPEECH, self.speech.decode(local)))
            else:
                segments.append(Segment(IMAGE, images[next_image]))
                next_image += 1
        return segments

    # ---- persistence --------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write text.json, image_vq.safetensors/.json, vocab.json and manifest.json (hashes)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.text.save(d / "text.json")
        self.image.save(d / "image_vq.safetensors")
        (d / "vocab.json").write_text(json.dumps(self.vocab.to_dict(), indent=2), encoding="utf-8")
        files = FILES
        if self.speech is not None:
            self.speech.save(d / SPEECH_FILES[0])
            files = FILES + SPEECH_FILES
        write_manifest(d, files, format_version=FORMAT_VERSION)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> MultimodalTokenizer:
        """Load a directory written by :meth:`save`, verifying every file hash.

        Raises:
            TokenizerCacheError: when the manifest or a file is missing, a hash differs, or a file
                does not parse.
        """
        d = Path(directory)
        files = _verify_manifest(d)
        try:
            text = BPETextTokenizer.load(d / "text.json")
            image = VQImageTokenizer.load(d / "image_vq.safetensors")
            vocab = UnifiedVocab.from_dict(json.loads((d / "vocab.json").read_text("utf-8")))
            speech = None
            if SPEECH_FILES[0] in files:
                speech = SpeechUnitTokenizer.load(d / SPEECH_FILES[0])
            return cls(text, image, vocab, speech)
        except Exception as e:  # any parse / shape error means the cache cannot be trusted
            raise TokenizerCacheError(f"{d}: cannot load tokenizer ({e})") from e


def _verify_manifest(d: Path) -> list[str]:
    manifest = read_manifest(d, TokenizerCacheError)
    files, version = manifest["files"], manifest["format_version"]
    if version != FORMAT_VERSION:
        raise TokenizerCacheError(f"{d}: format_version {version}, expected {FORMAT_VERSION}")
    allowed = (set(FILES), set(FILES + SPEECH_FILES))
    if not isinstance(files, dict) or set(files) not in allowed:
        raise TokenizerCacheError(f"{d}: manifest lists {files}, expected {list(FILES)}")
    verify_files(d, files, TokenizerCacheError)
    return list(files)
