"""Document sources: the data config and a small registry from source name to constructor.

A source has ``name: str``, ``fingerprint() -> str`` and ``document(index) -> Document``
(deterministic random access). It knows nothing about tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    """

    source: str = "scenes"
    seq_len: int = 256
    batch_size: int = 8
    image_size: int = 32
    doc_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DOC_MIX))
    val_batches: int = 8

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(
                f"data.source: unknown source {self.source!r}; valid: {sorted(SOURCES)}"
            )
        for name in ("seq_len", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.val_batches < 0:
            raise ValueError(f"data.val_batches must be >= 0, got {self.val_batches}")
        validate_doc_mix(self.doc_mix, field="data.doc_mix")


def _build_scenes(cfg: DataConfig, seed: int, split: str) -> SceneCorpus:
    return SceneCorpus(seed=seed, split=split, image_size=cfg.image_size, doc_mix=cfg.doc_mix)  # type: ignore[arg-type]


SOURCES: dict[str, Callable[[DataConfig, int, str], Any]] = {"scenes": _build_scenes}


def build_source(cfg: DataConfig, *, seed: int, split: str) -> Any:
    """Build the document source named by ``cfg.source``.

    Args:
        cfg: the data config.
        seed: corpus seed (the same seed gives the same documents).
        split: ``"train"`` or ``"val"``.

    Returns:
        A source with ``name``, ``fingerprint()`` and ``document(index)``.

    Raises:
        ValueError: for an unknown source name or split.
    """
    if cfg.source not in SOURCES:
        raise ValueError(f"unknown data source {cfg.source!r}; valid: {sorted(SOURCES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    return SOURCES[cfg.source](cfg, seed, split)
