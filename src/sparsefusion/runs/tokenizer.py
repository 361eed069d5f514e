"""The tokenizer of a run: trained (or loaded) once by the trainer, then kept in the run folder.

The trainer gets its tokenizer from the shared cache (``tokenizer.cache_dir``, trained on first
use), from ``tokenizer.path``, or from a token-shard folder, and saves a copy in
``RUN_DIR/tokenizer/``. Every later opener (train-aux, eval, generate, serve, a resumed run)
loads that copy, from any working directory, and never trains one. Runs written before the copy
existed fall back to where the trainer found theirs, again without training.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from sparsefusion.checkpoint.resume import step_folders
from sparsefusion.data.sources import build_source
from sparsefusion.distributed.mesh import DistEnv, barrier
from sparsefusion.runs.config import TrainConfig
from sparsefusion.tokenizers.build import (
    TokenizerCacheError,
    cache_key,
    load_or_train_tokenizer,
    load_tokenizer,
)

log = logging.getLogger("sparsefusion")

TOKENIZER_DIR = "tokenizer"


def tokenizer_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / TOKENIZER_DIR


def training_tokenizer(
    cfg: TrainConfig, env: DistEnv, *, progress: bool, log_fn: Callable[[str], None] = log.info
) -> Any:
    """The tokenizer a (possibly resumed) training run uses, kept in its run folder.

    A resumed run (one with a checkpoint) loads its own copy. Otherwise rank 0 loads or trains
    it (tokenizers always learn from the seed-0 training stream, so every run of a corpus shares
    them) and saves the copy (replacing one left by a start that never reached a checkpoint),
    and the other ranks load that copy.
    """
    run_dir = Path(cfg.run.dir)
    own = tokenizer_dir(run_dir)
    # Each load builds the image tokenizer's modules (their initialisation draws from torch's
    # global RNG before the weights are read): exactly one load per process keeps the model's
    # initialisation where it always was.
    tok = None
    if not (own.is_dir() and step_folders(run_dir)):
        if env.is_main:
            source = build_source(cfg.data, seed=0, split="train")
            if hasattr(source, "tokenizer_dir"):  # token shards carry the tokenizer of their ids
                tok = load_tokenizer(source.tokenizer_dir())
            else:
                tok = load_or_train_tokenizer(cfg.tokenizer, source, progress=progress, log=log_fn)
            pin_tokenizer(run_dir, tok, replace=True)
        barrier()
    if tok is None:
        tok = load_tokenizer(own)
    log_fn(f"tokenizer: {own}")
    return tok


def pin_tokenizer(run_dir: str | Path, tokenizer: Any, *, replace: bool = False) -> Path:
    """Save ``tokenizer`` as the run's own, atomically (an existing copy is kept unless
    ``replace``)."""
    final = tokenizer_dir(run_dir)
    if final.is_dir() and not replace:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=final.parent))
    try:
        tokenizer.save(tmp / "new")
        if final.is_dir():
            final.replace(tmp / "old")
        (tmp / "new").replace(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def run_tokenizer(run_dir: str | Path, cfg: TrainConfig) -> Any:
    """The tokenizer run ``run_dir`` trained with (never trains one), bound to its model.

    Raises:
        ValueError: naming every place looked at, when none holds it.
    """
    tried = []
    for where in _candidates(run_dir, cfg):
        if where is None:
            continue
        tried.append(str(where))
        if where.is_dir():
            try:
                tokenizer = load_tokenizer(where)
            except TokenizerCacheError as e:
                raise ValueError(f"{where}: the run's tokenizer is damaged ({e})") from e
            tokenizer.bind_model(cfg.model)  # how many positions an image takes
            return tokenizer
    raise ValueError(
        f"{run_dir}: the tokenizer this run trained with is not found (looked in "
        f"{', '.join(tried)}); runs written by this version keep it in {tokenizer_dir(run_dir)}. "
        "Run from the folder you trained in, or set tokenizer.cache_dir to an absolute path"
    )


def _candidates(run_dir: str | Path, cfg: TrainConfig):
    """Where a run's tokenizer may be: its own copy, then (older runs) the trainer's sources."""
    yield tokenizer_dir(run_dir)
    if cfg.tokenizer.path:
        yield Path(cfg.tokenizer.path)
        return
    source = build_source(cfg.data, seed=0, split="train")
    if hasattr(source, "tokenizer_dir"):
        yield Path(source.tokenizer_dir())
        return
    yield Path(cfg.tokenizer.cache_dir) / f"{source.name}-{cache_key(cfg.tokenizer, source)}"


def finalize_config(cfg: TrainConfig, tokenizer: Any) -> TrainConfig:
    """Fill the fields that come from the tokenizer (vocabulary size; for continuous images the
    latent channels) and check that the config fits it; binds the tokenizer to the model."""
    if list(cfg.model.modalities) != list(tokenizer.modalities):
        raise ValueError(
            f"model.modalities={cfg.model.modalities} but the data/tokenizer provide "
            f"{tokenizer.modalities}"
        )
    vocab_size = tokenizer.vocab.padded_size()
    model = cfg.model
    if model.vocab_size == 0:
        model = replace(model, vocab_size=vocab_size)
    elif model.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={model.vocab_size} < tokenizer's {vocab_size}")
    model = tokenizer.bind_model(model)  # e.g. latent channels and patch size
    return replace(cfg, model=model)
