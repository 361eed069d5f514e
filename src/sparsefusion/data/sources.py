"""Document sources: the data config and a small registry from source name to constructor.

A source has ``name: str``, ``fingerprint() -> str`` and ``document(index) -> Document``
(deterministic random access). It knows nothing about tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from sparsefusion.data.limits import InputLimits
from sparsefusion.data.scenes import DEFAULT_DOC_MIX, SceneCorpus, validate_doc_mix

SPLITS = ("train", "val")


@dataclass(kw_only=True)
class DataConfig:
    """Data pipeline settings.

    Attributes:
        source: registered source name (see ``SOURCES``).
        seq_len: tokens per packed row (inputs; each row reads ``seq_len + 1`` ids).
        batch_size: rows per batch on each rank.
        image_size: side of the source's square images, in pixels.
        doc_mix: relative weight of each document kind (caption_image, image_caption, text_only,
            interleaved).
        val_batches: number of fixed validation batches.
        path: users' data: a JSONL file of interleaved documents, a folder of WebDataset
            ``.tar`` shards, or a folder of token shards from ``sparsefusion data tokenize``
            (used when ``source`` is ``path``, or ``scenes`` left at its default).
        mixture: source name -> sampling weight, for ``source=mixture``.
        val_source_batches: for ``source=mixture``: fixed validation batches of each source of
            the mix alone, logged beside the mix's as ``loss/source/<name>`` and
            ``loss/source/<name>/<modality>`` at every evaluation (0: off). It shows which
            source a mix's validation loss comes from, e.g. a small source memorised.
        val_fraction: fraction of a finite user dataset held out for validation.
        strict: fail on the first bad input item instead of skipping and counting it.
        max_doc_tokens: documents longer than this (in tokens) are skipped as oversize (0: never).
        max_doc_bytes: users' data: a JSONL line or caption longer than this (in bytes) is
            skipped as oversize before it is parsed or tokenized.
        max_file_bytes: users' data: an image or audio file larger than this is skipped.
        max_image_pixels: users' data: an image with more pixels (width x height, read from its
            header) is skipped before it is decoded.
        max_audio_seconds: users' data: an audio clip longer than this (from its header) is
            skipped before it is decoded.
        workers: background workers producing batches ahead of the step (0: load in the
            training thread); ``auto``: one, unless the step's torch threads already occupy
            every core of a CPU run, where a worker only preempts them (then 0); see
            ``data/prefetch.py``.
        prefetch: ready batches queued per stream when ``workers`` >= 1.
        worker_kind: ``process`` (forked workers, no GIL shared with training) or ``thread``.
        worker_nice: scheduling niceness added to process workers (0-19; 0 = the trainer's), so
            that where cores are short a worker fills idle time instead of preempting the
            step's compute threads.
    """

    source: str = "scenes"
    seq_len: int = 256
    batch_size: int = 8
    image_size: int = 32
    doc_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DOC_MIX))
    val_batches: int = 8
    path: str = ""
    mixture: dict[str, float] = field(default_factory=dict)
    val_source_batches: int = 0
    val_fraction: float = 0.05
    strict: bool = False
    max_doc_tokens: int = 16384
    max_doc_bytes: int = InputLimits.max_doc_bytes
    max_file_bytes: int = InputLimits.max_file_bytes
    max_image_pixels: int = InputLimits.max_image_pixels
    max_audio_seconds: float = InputLimits.max_audio_seconds
    workers: int | Literal["auto"] = "auto"
    prefetch: int = 2
    worker_kind: str = "process"
    worker_nice: int = 10

    def __post_init__(self) -> None:
        if self.path and self.source == "scenes":
            self.source = "path"
        if self.source not in SOURCES:
            raise ValueError(
                f"data.source: unknown source {self.source!r}; valid: {sorted(SOURCES)}"
            )
        for name in ("seq_len", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.val_batches < 0:
            raise ValueError(f"data.val_batches must be >= 0, got {self.val_batches}")
        if self.val_source_batches < 0:
            raise ValueError(f"data.val_source_batches must be >= 0, got {self.val_source_batches}")
        if self.val_source_batches and self.source != "mixture":
            raise ValueError(
                f"data.val_source_batches needs data.source=mixture (source is {self.source!r})"
            )
        validate_doc_mix(self.doc_mix, field="data.doc_mix")
        if self.source == "path" and not self.path:
            raise ValueError(
                "data.source=path needs data.path=FILE.jsonl or a folder of .tar shards"
            )
        if self.source == "mixture":
            bad = sorted(set(self.mixture) - (set(SOURCES) - {"mixture"}))
            if not self.mixture or bad:
                raise ValueError(
                    f"data.mixture must map source names to weights (unknown: {bad}); "
                    f"valid: {sorted(set(SOURCES) - {'mixture'})}"
                )
            if any(w <= 0 for w in self.mixture.values()):
                raise ValueError(f"data.mixture weights must be positive, got {self.mixture}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_doc_tokens < 0:
            raise ValueError(f"data.max_doc_tokens must be >= 0, got {self.max_doc_tokens}")
        for name in ("max_doc_bytes", "max_file_bytes", "max_image_pixels", "max_audio_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"data.{name} must be > 0, got {getattr(self, name)}")
        if (self.workers != "auto" and self.workers < 0) or self.prefetch < 1:
            raise ValueError(
                f"data.workers must be 'auto' or >= 0 and data.prefetch >= 1, got {self.workers}, "
                f"{self.prefetch}"
            )
        if not 0 <= self.worker_nice <= 19:
            raise ValueError(f"data.worker_nice must be in [0, 19], got {self.worker_nice}")
        if self.worker_kind not in ("process", "thread"):
            raise ValueError(
                f"data.worker_kind must be 'process' or 'thread', got {self.worker_kind!r}"
            )

    def limits(self) -> InputLimits:
        """The per-record limits of users' data."""
        return InputLimits(
            max_file_bytes=self.max_file_bytes,
            max_doc_bytes=self.max_doc_bytes,
            max_image_pixels=self.max_image_pixels,
            max_audio_seconds=self.max_audio_seconds,
        )


def _build_scenes(cfg: DataConfig, seed: int, split: str) -> SceneCorpus:
    return SceneCorpus(seed=seed, split=split, image_size=cfg.image_size, doc_mix=cfg.doc_mix)  # type: ignore[arg-type]


def _build_path(cfg: DataConfig, seed: int, split: str) -> Any:
    from pathlib import Path

    from sparsefusion.data.jsonl_source import JsonlSource
    from sparsefusion.data.token_shards import TokenShardSource, is_token_dir
    from sparsefusion.data.wds_source import WebDatasetSource

    if is_token_dir(cfg.path):  # written by `sparsefusion data tokenize`
        return TokenShardSource(cfg.path, split=split)
    kw = {"split": split, "image_size": cfg.image_size, "val_fraction": cfg.val_fraction}
    kw["limits"] = cfg.limits()
    if Path(cfg.path).is_dir():
        return WebDatasetSource(cfg.path, strict=cfg.strict, **kw)
    return JsonlSource(cfg.path, **kw)


def _build_openmoji(cfg: DataConfig, seed: int, split: str) -> Any:
    from sparsefusion.data.image_sources import OpenMojiSource

    return OpenMojiSource(split=split, image_size=cfg.image_size, seed=seed)


def _build_fashion(cfg: DataConfig, seed: int, split: str) -> Any:
    from sparsefusion.data.image_sources import FashionMnistSource

    return FashionMnistSource(split=split, image_size=cfg.image_size, seed=seed)


def _build_kjv(cfg: DataConfig, seed: int, split: str) -> Any:
    from sparsefusion.data.text_sources import KjvSource

    return KjvSource(split=split)


def _build_austen(cfg: DataConfig, seed: int, split: str) -> Any:
    from sparsefusion.data.text_sources import AustenSource

    return AustenSource(split=split)


def _build_speech(cfg: DataConfig, seed: int, split: str) -> Any:
    from sparsefusion.data.speech_source import SpeechSynthSource

    return SpeechSynthSource(seed=seed, split=split)


def _build_mixture(cfg: DataConfig, seed: int, split: str) -> Any:
    from sparsefusion.data.mixture import MixtureSource

    parts = {name: SOURCES[name](cfg, seed, split) for name in cfg.mixture}
    return MixtureSource(parts, cfg.mixture, seed=seed, split=split)


SOURCES: dict[str, Callable[[DataConfig, int, str], Any]] = {
    "scenes": _build_scenes,
    "path": _build_path,
    "mixture": _build_mixture,
    "openmoji": _build_openmoji,
    "fashion_mnist": _build_fashion,
    "kjv": _build_kjv,
    "austen": _build_austen,
    "speech": _build_speech,
}


def build_source(cfg: DataConfig, *, seed: int, split: str) -> Any:
    """Build the document source named by ``cfg.source``.

    Args:
        cfg: the data config.
        seed: corpus seed (the same seed gives the same documents).
        split: ``"train"`` or ``"val"``.

    Returns:
        A source with ``name``, ``fingerprint()`` and ``document(index)`` (and ``__len__`` when
        finite, ``modalities`` when it is not text+image).

    Raises:
        ValueError: for an unknown source name or split, or a source whose optional package is
            not installed (``SourceUnavailable``, naming what to install).
    """
    if cfg.source not in SOURCES:
        raise ValueError(f"unknown data source {cfg.source!r}; valid: {sorted(SOURCES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    return SOURCES[cfg.source](cfg, seed, split)
