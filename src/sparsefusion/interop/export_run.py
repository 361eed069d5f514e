"""``sparsefusion export RUN --format hf|hub``: a run's newest checkpoint as a Hugging Face folder.

``hf``: a dense run, or tower ``--tower`` (default: the text tower) of a MoT/MoMa run, as a
Llama/Qwen2 folder for ``transformers`` (``export_hf.py``), with the run's tokenizer.
``hub``: any run as a ``PyTorchModelHubMixin`` folder with a model card (``hub.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sparsefusion.config import from_dict, load_yaml
from sparsefusion.interop.export_hf import export_hf, write_tokenizer
from sparsefusion.models.transformer import Transformer
from sparsefusion.train.checkpoint import CheckpointError

log = logging.getLogger("sparsefusion")


def load_run_model(run_dir: Path) -> tuple[Transformer, Any, Path]:
    """The run's model (newest valid checkpoint, eval mode), its TrainConfig and the checkpoint."""
    from sparsefusion.train.config import TrainConfig
    from sparsefusion.train.resume import step_folders
    from sparsefusion.train.weights import load_weights, pick_checkpoint

    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml)")
    if not step_folders(run_dir):
        raise CheckpointError(f"{run_dir} holds no complete checkpoint")
    cfg = from_dict(TrainConfig, load_yaml(run_dir / "config.yaml"))
    model = Transformer(cfg.model)
    ckpt = pick_checkpoint(run_dir, model)
    load_weights(ckpt, model)
    return model.eval(), cfg, ckpt


def run_tokenizer(cfg: Any):
    """The run's tokenizer (as generation loads it: ``tokenizer.path`` or the cache)."""
    from sparsefusion.data.sources import build_source
    from sparsefusion.tokenizers.build import load_or_train_tokenizer, load_tokenizer

    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    source = build_source(cfg.data, seed=0, split="train")
    return load_or_train_tokenizer(cfg.tokenizer, source, progress=False, log=log.info)


def export_run_hf(run_dir: str | Path, out: str | Path | None = None, tower: str = "") -> Path:
    """Write ``out`` (default ``RUN_DIR/export-hf``) as a Llama/Qwen2 folder.

    Args:
        run_dir: the run folder.
        out: the output folder.
        tower: the tower to write (default: the text modality's tower).
    """
    run_dir = Path(run_dir)
    model, cfg, ckpt = load_run_model(run_dir)
    names = cfg.model.tower_names
    name = tower or names[cfg.model.tower_of_modality[0]]
    if name not in names:
        raise ValueError(f"--tower {name!r}: the run's towers are {names}")
    tokenizer = run_tokenizer(cfg)
    vocab = tokenizer.vocab
    ids = {"bos": vocab.bos_id, "eos": vocab.eos_id, "pad": vocab.pad_id}
    out = Path(out) if out is not None else run_dir / "export-hf"
    export_hf(model, out, tower=names.index(name), token_ids=ids)
    write_tokenizer(out, tokenizer.text.to_json(), vocab)
    log.info("exported tower %s of %s (%s) to %s", name, run_dir, ckpt.name, out)
    return out


def export_run_hub(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``out`` (default ``RUN_DIR/export-hub``) with ``save_pretrained`` + a model card."""
    from sparsefusion.interop.hub import model_card, to_hub_model
    from sparsefusion.train.metrics import read_metrics

    run_dir = Path(run_dir)
    model, cfg, ckpt = load_run_model(run_dir)
    metrics = run_dir / "metrics.jsonl"
    rows = read_metrics(metrics) if metrics.is_file() else []
    config = load_yaml(run_dir / "config.yaml")
    card = model_card(run_dir, config, rows, ckpt.name, model.cfg)
    out = Path(out) if out is not None else run_dir / "export-hub"
    to_hub_model(model, card).save_pretrained(out)
    try:
        run_tokenizer(cfg).save(out / "tokenizer")
    except (OSError, ValueError) as e:  # the model folder is complete without it
        log.warning("export --format hub: the run's tokenizer was not written (%s)", e)
    return out
