"""Load what generation needs from a run folder: model, tokenizer and auxiliary routers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from sparsefusion.checkpoint.store import CheckpointError
from sparsefusion.checkpoint.weights import load_weights, pick_checkpoint
from sparsefusion.config import from_dict, load_yaml
from sparsefusion.generate.engine import MissingAuxRouters, aux_router_message
from sparsefusion.models.transformer import Transformer
from sparsefusion.nn.aux_router import AuxRouters
from sparsefusion.tokenizers.multimodal import MultimodalTokenizer

log = logging.getLogger("sparsefusion")

AUX_FILE = Path("aux_routers") / "aux_routers.safetensors"


@dataclass
class LoadedRun:
    """A trained run ready to sample from."""

    model: Transformer
    tokenizer: MultimodalTokenizer
    aux_routers: AuxRouters | None
    checkpoint: Path
    max_speech_units: int
    config: Any = None


def load_run(run_dir: str | Path, checkpoint: int | None = None, device="cpu") -> LoadedRun:
    """Model (eval, on ``device``: ``auto`` = CUDA when there is one), tokenizer, aux routers.

    Raises:
        MissingAuxRouters: the model has batch-routed sites and the run has no aux routers.
    """
    from sparsefusion.data.sources import build_source
    from sparsefusion.runs.config import TrainConfig
    from sparsefusion.runtime.device import resolve_device
    from sparsefusion.tokenizers.build import load_or_train_tokenizer

    device = resolve_device(str(device))
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = from_dict(TrainConfig, load_yaml(run_dir / "config.yaml"))
    model = Transformer(cfg.model)
    ckpt = pick_checkpoint(run_dir, model, checkpoint)
    aux = None
    if model.router_sites():
        aux = _load_aux(run_dir, model)
    load_weights(ckpt, model)
    if cfg.tokenizer.path:  # a tokenizer folder used as is
        from sparsefusion.tokenizers.build import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer.path)
    else:  # the run's cached tokenizer (trained again, as the trainer would, if missing)
        source = build_source(cfg.data, seed=0, split="train")
        tokenizer = load_or_train_tokenizer(cfg.tokenizer, source, log=log.info)
    units = max(1, int(cfg.data.seq_len) // 2)
    model.to(device).eval().requires_grad_(False)
    if aux is not None:
        aux.to(device).eval().requires_grad_(False)
    return LoadedRun(model, tokenizer, aux, ckpt, units, cfg)


def _load_aux(run_dir: Path, model: Transformer) -> AuxRouters:
    path = run_dir / AUX_FILE
    if not path.is_file():
        raise MissingAuxRouters(aux_router_message(str(run_dir), list(model.router_sites())))
    aux = AuxRouters(model.cfg.dim, model.router_sites())
    try:
        aux.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"{path} does not match the model's router sites: {e}") from e
    return aux
