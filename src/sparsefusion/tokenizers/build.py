"""Train the multimodal tokenizer from a document source, or reuse a verified cached copy.

The cache directory is ``<cache_dir>/<source.name>-<key>`` where ``key`` hashes every
:class:`TokenizerConfig` field except ``cache_dir`` together with ``source.fingerprint()``. A
cached copy that fails verification is reported (``warnings.warn`` and ``log``) and retrained;
new copies are written to a temporary directory and moved into place with ``os.replace``.
Speech settings enter the key only for sources with speech, so text+image keys are unchanged.
``tokenizer.path`` points at a tokenizer directory (``sparsefusion tokenizer train``) to use as is.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from filelock import FileLock, Timeout
from PIL import Image

from sparsefusion.data.documents import IMAGE, SPEECH, TEXT, Document
from sparsefusion.data.issues import BadInput
from sparsefusion.data.mixture import vocab_modalities
from sparsefusion.data.text import read_document
from sparsefusion.tokenizers.image_vae import ImageVAEConfig, train_vae
from sparsefusion.tokenizers.image_vq import ImageVQConfig, VQImageTokenizer, train_vq
from sparsefusion.tokenizers.manifest import sha256_file
from sparsefusion.tokenizers.multimodal import (
    FORMAT_VERSION,
    MultimodalTokenizer,
    TokenizerCacheError,
)
from sparsefusion.tokenizers.speech_units import SpeechUnitsConfig, train_speech_units
from sparsefusion.tokenizers.text_bpe import NUM_BYTES, BPETextTokenizer
from sparsefusion.tokenizers.transfusion import TransfusionTokenizer, manifest_kind
from sparsefusion.tokenizers.vocab import UnifiedVocab

IMAGE_KINDS = ("auto", "vq", "vae")


@dataclass(kw_only=True)
class TokenizerConfig:
    """How the tokenizers are trained and where they are cached.

    Attributes:
        text_vocab_size: BPE vocabulary size (>= 256, byte symbols included).
        text_train_docs: documents 0..N-1 whose text segments train the BPE.
        image: the VQ image tokenizer settings.
        image_train_images: images collected (from document 0 on) to train the VQ.
        cache_dir: root of the tokenizer cache (not part of the cache key).
        speech: the speech unit tokenizer settings (used when the source has speech).
        speech_train_clips: speech clips collected (from document 0 on) to train the units.
        path: a trained tokenizer directory to load instead of training (empty: train/cache).
        image_kind: "vq" (discrete codes, the Chameleon setting) or "vae" (continuous latents
            of a KL autoencoder, the Transfusion setting; needs the ``transfusion`` extra).
            "auto" (the default): what the objective trains on (``objective.name``; a run's
            resolved config states it); a tokenizer config used alone reads it as "vq".
        vae: the autoencoder settings (used when ``image_kind`` is "vae").
        text_path: a Hugging Face ``tokenizer.json`` (byte-level BPE, e.g. a pretrained LLM's)
            used as the text tokenizer instead of training one (empty: train); the file's hash
            enters the cache key. ``init.from_hf`` sets it.
    """

    text_vocab_size: int = 2048
    text_train_docs: int = 4000
    image: ImageVQConfig = field(default_factory=ImageVQConfig)
    image_train_images: int = 8000
    cache_dir: str = ".cache/sparsefusion/tokenizers"
    speech: SpeechUnitsConfig = field(default_factory=SpeechUnitsConfig)
    speech_train_clips: int = 400
    path: str = ""
    image_kind: str = "auto"
    vae: ImageVAEConfig = field(default_factory=ImageVAEConfig)
    text_path: str = ""

    def __post_init__(self) -> None:
        if self.image_kind not in IMAGE_KINDS:
            raise ValueError(
                f"tokenizer.image_kind must be one of {IMAGE_KINDS}, got {self.image_kind!r}"
            )
        if self.text_vocab_size < NUM_BYTES:
            raise ValueError(
                f"TokenizerConfig.text_vocab_size must be >= {NUM_BYTES}, "
                f"got {self.text_vocab_size}"
            )
        if self.text_train_docs <= 0:
            raise ValueError(
                f"TokenizerConfig.text_train_docs must be positive, got {self.text_train_docs}"
            )
        if self.image_train_images <= 0:
            raise ValueError(
                "TokenizerConfig.image_train_images must be positive, "
                f"got {self.image_train_images}"
            )
        if self.speech_train_clips <= 0:
            raise ValueError(
                f"tokenizer.speech_train_clips must be positive, got {self.speech_train_clips}"
            )
        if not self.cache_dir:
            raise ValueError("TokenizerConfig.cache_dir must not be empty")


class DocumentSource(Protocol):
    """What :func:`load_or_train_tokenizer` needs from a corpus."""

    name: str

    def fingerprint(self) -> str: ...

    def document(self, index: int) -> Document: ...


def cache_key(cfg: TokenizerConfig, source: DocumentSource) -> str:
    """Hash of the config (without ``cache_dir``), the source fingerprint and the file format."""
    settings = asdict(cfg)
    settings.pop("cache_dir")
    settings.pop("path")
    # Only the image tokenizer in use enters the key (VQ keys are unchanged by the VAE fields).
    kind = _image_kind(cfg)
    settings.pop("image_kind")
    settings.pop("vae" if kind == "vq" else "image")
    if kind != "vq":
        settings["image_kind"] = kind
    if SPEECH not in vocab_modalities(source):
        settings.pop("speech")
        settings.pop("speech_train_clips")
    text_path = settings.pop("text_path")
    if text_path:  # a given text tokenizer: its content, not the BPE settings, is the key
        for key in ("text_vocab_size", "text_train_docs"):
            settings.pop(key)
        try:
            settings["text_sha256"] = sha256_file(Path(text_path))
        except OSError as e:
            raise ValueError(f"tokenizer.text_path={text_path}: cannot read it ({e})") from e
    blob = json.dumps(
        {"cfg": settings, "source": source.fingerprint(), "format": FORMAT_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def load_or_train_tokenizer(
    cfg: TokenizerConfig,
    source: DocumentSource,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> MultimodalTokenizer | TransfusionTokenizer:
    """Return the tokenizer for ``source``, from the cache when a verified copy exists.

    Args:
        cfg: tokenizer settings.
        source: the corpus (``name``, ``fingerprint()``, ``document(i)``).
        progress: show tqdm progress bars while training.
        log: sink for one-line status messages.

    Returns:
        The multimodal tokenizer (text BPE, image VQ, speech units when the source has speech,
        unified vocabulary).

    Raises:
        ValueError: when ``cfg.path`` is set but does not hold a valid tokenizer.
    """
    if cfg.path:
        try:
            tok = load_tokenizer(cfg.path)
        except TokenizerCacheError as e:
            raise ValueError(f"tokenizer.path: {e}") from e
        log(f"tokenizer: loaded {cfg.path} (tokenizer.path)")
        return tok
    root = Path(cfg.cache_dir)
    final = root / f"{source.name}-{cache_key(cfg, source)}"
    tok = _load_cached(final, log)
    if tok is not None:
        return tok
    # One process trains, the others wait for its copy (runs of a sweep start together).
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / f".{final.name}.lock")
    if not _try_acquire(lock):
        log(f"tokenizer: another process is training {final.name}; waiting for it")
        lock.acquire()
    try:
        tok = _load_cached(final, log)  # the process that held the lock may have written it
        if tok is None:
            tok = train_tokenizer(cfg, source, progress=progress, log=log)
            _write_atomically(tok, root, final)
            log(f"tokenizer: saved {final}")
    finally:
        lock.release()
    return tok


def _try_acquire(lock: FileLock) -> bool:
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    return True


def _load_cached(final: Path, log: Callable[[str], None]):
    """The cached tokenizer at ``final``, or None (absent, or corrupt: then retrained)."""
    if not final.exists():
        return None
    try:
        tok = load_tokenizer(final)
    except TokenizerCacheError as e:
        msg = f"tokenizer cache {final} is corrupt ({e}); retraining"
        warnings.warn(msg, stacklevel=2)
        log(msg)
        return None
    log(f"tokenizer: loaded {final}")
    return tok


def load_tokenizer(directory: str | Path) -> MultimodalTokenizer | TransfusionTokenizer:
    """Load a saved tokenizer of either kind (discrete Chameleon or Transfusion)."""
    if manifest_kind(directory) == "latent":  # the Transfusion tokenizer's kind
        return TransfusionTokenizer.load(directory)
    return MultimodalTokenizer.load(directory)


def train_tokenizer(
    cfg: TokenizerConfig,
    source: DocumentSource,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> MultimodalTokenizer | TransfusionTokenizer:
    """Train the BPE, the VQ (or VAE) and (for a source with speech) the speech units."""
    texts, images, clips = collect_training_data(cfg, source)
    if cfg.text_path:
        text = BPETextTokenizer.load(cfg.text_path)
        log(f"tokenizer: text from {cfg.text_path} ({text.vocab_size} ids)")
    else:
        log(f"tokenizer: training BPE ({cfg.text_vocab_size}) on {len(texts)} text segments")
        text = BPETextTokenizer.train(texts, cfg.text_vocab_size)
    if _image_kind(cfg) == "vae":
        return _train_transfusion(cfg, text, images, progress, log)
    if images:
        log(f"tokenizer: training image VQ on {len(images)} images ({cfg.image.train_steps} steps)")
        image, report = train_vq(cfg.image, images, progress=progress)
        log(
            f"tokenizer: image VQ recon_mse={report['recon_mse']:.5f} "
            f"codebook_usage={report['codebook_usage']:.3f} perplexity={report['perplexity']:.1f} "
            f"({report['train_seconds']:.0f}s)"
        )
    else:
        msg = f"source {source.name!r} has no images; the image VQ is left untrained"
        warnings.warn(msg, stacklevel=2)
        log(f"tokenizer: {msg}")
        image = VQImageTokenizer(cfg.image).eval()
    sizes = {TEXT: text.vocab_size, IMAGE: image.codebook_size}
    speech = None
    if SPEECH in vocab_modalities(source) and not clips:
        msg = (
            f"source {source.name!r} has speech segments but no readable clip among the "
            f"documents read; the tokenizer is built without speech and documents with speech "
            "are skipped (counted as unknown_segment)"
        )
        warnings.warn(msg, stacklevel=2)
        log(f"tokenizer: {msg}")
    elif SPEECH in vocab_modalities(source):
        log(f"tokenizer: training {cfg.speech.num_units} speech units on {len(clips)} clips")
        speech, rep = train_speech_units(cfg.speech, clips)
        log(
            f"tokenizer: speech units frames={rep['frames']} usage={rep['usage']:.3f} "
            f"mse={rep['mse']:.3f} ({rep['train_seconds']:.0f}s)"
        )
        sizes[SPEECH] = speech.codebook_size
    return MultimodalTokenizer(text, image, UnifiedVocab(sizes), speech)


def _image_kind(cfg: TokenizerConfig) -> str:
    return "vq" if cfg.image_kind == "auto" else cfg.image_kind


def _train_transfusion(cfg, text, images, progress, log) -> TransfusionTokenizer:
    if not images:
        raise ValueError("tokenizer.image_kind=vae needs a source with images; none was found")
    log(f"tokenizer: training image VAE on {len(images)} images ({cfg.vae.train_steps} steps)")
    vae, report = train_vae(cfg.vae, images, progress=progress)
    log(
        f"tokenizer: image VAE recon_mse={report['recon_mse']:.5f} "
        f"recon_l1={report['recon_l1']:.4f} latent_std={report['latent_std']:.3f} "
        f"({report['train_seconds']:.0f}s)"
    )
    return TransfusionTokenizer(text, vae, UnifiedVocab({TEXT: text.vocab_size, IMAGE: 1}))


def collect_training_data(
    cfg: TokenizerConfig, source: DocumentSource
) -> tuple[list[str], list[Image.Image], list[torch.Tensor]]:
    """Text segments of documents ``0..text_train_docs-1``; images (and speech clips) from
    document 0 on until ``image_train_images`` (``speech_train_clips``) are found, the source ends
    (``IndexError``), or none has been seen after ``text_train_docs`` documents. Bad documents
    (``BadInput``) are skipped with a warning.

    Raises:
        ValueError: when no usable document was found (nothing is trained, nothing cached).
    """
    texts: list[str] = []
    images: list[Image.Image] = []
    clips: list[torch.Tensor] = []
    want_speech = SPEECH in vocab_modalities(source)
    index, skipped = 0, Counter[str]()
    while True:
        need_text = index < cfg.text_train_docs
        need_images = len(images) < cfg.image_train_images and (bool(images) or need_text)
        need_clips = want_speech and len(clips) < cfg.speech_train_clips
        need_clips = need_clips and (bool(clips) or need_text)
        if not (need_text or need_images or need_clips):
            break
        try:
            doc = read_document(source, index)
        except IndexError:
            break
        except BadInput as e:
            warnings.warn(f"tokenizer training: skipped {e}", stacklevel=2)
            skipped[e.reason] += 1
            index += 1
            continue
        for seg in doc.segments:
            if seg.modality == TEXT and need_text:
                texts.append(seg.payload)
            elif seg.modality == IMAGE and need_images:
                images.append(seg.payload)
            elif seg.modality == SPEECH and need_clips:
                clips.append(seg.payload)
        index += 1
    if not (texts or images or clips):
        place = getattr(source, "path", None) or getattr(source, "folder", None) or source.name
        raise ValueError(
            f"{place}: no usable document among the {index} read (skipped: "
            f"{dict(skipped) or 'none'}); nothing to train the tokenizer on"
        )
    return texts, images[: cfg.image_train_images], clips[: cfg.speech_train_clips]


def _write_atomically(tok: MultimodalTokenizer, root: Path, final: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        tok.save(tmp)
        if final.exists():  # a corrupt copy: move it aside first (os.replace needs an empty target)
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=root))
            final.replace(trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        tmp.replace(final)
    except OSError:
        if not final.exists():  # lost a race only if another process won it
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
