"""Load what generation needs from a run folder: model, tokenizer and auxiliary routers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sparsefusion.checkpoint.store import CheckpointError
from sparsefusion.generate.engine import MissingAuxRouters, aux_router_message
from sparsefusion.models.transformer import Transformer
from sparsefusion.nn.aux_router import AuxRouters
from sparsefusion.runs.config import TrainConfig
from sparsefusion.runs.folder import aux_routers_path, load_aux_routers, load_model, run_config
from sparsefusion.runs.tokenizer import run_tokenizer
from sparsefusion.runtime.device import resolve_device
from sparsefusion.tokenizers.multimodal import MultimodalTokenizer

log = logging.getLogger("sparsefusion")


@dataclass
class LoadedRun:
    """A trained run ready to sample from."""

    model: Transformer
    tokenizer: MultimodalTokenizer
    aux_routers: AuxRouters | None
    checkpoint: Path
    max_speech_units: int
    config: TrainConfig


def load_run(run_dir: str | Path, checkpoint: int | None = None, device="cpu") -> LoadedRun:
    """Model (eval, on ``device``: ``auto`` = CUDA when there is one), tokenizer, aux routers.

    Raises:
        MissingAuxRouters: the model has batch-routed sites and the run has no aux routers.
        CheckpointError: no usable checkpoint, or aux routers that do not fit the model.
    """
    device = resolve_device(str(device))
    cfg = run_config(run_dir)
    model, ckpt, _ = load_model(run_dir, cfg, checkpoint, device)
    aux = None
    if model.router_sites():
        aux, why = load_aux_routers(run_dir, model, device)
        if aux is None and not aux_routers_path(run_dir).is_file():
            raise MissingAuxRouters(aux_router_message(str(run_dir), list(model.router_sites())))
        if aux is None:
            raise CheckpointError(why)
    tokenizer = run_tokenizer(run_dir, cfg)
    units = max(1, int(cfg.data.seq_len) // 2)
    return LoadedRun(model, tokenizer, aux, ckpt, units, cfg)
