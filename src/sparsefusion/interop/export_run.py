"""``sparsefusion export RUN --format hf|hub``: a run's newest checkpoint as a Hugging Face folder.

``hf``: a dense run, or tower ``--tower`` (default: the text tower) of a MoT/MoMa run, as a
Llama/Qwen2 folder for ``transformers`` (``export_hf.py``), with the run's tokenizer.
``hub``: any run as a ``PyTorchModelHubMixin`` folder with a model card (``hub.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from sparsefusion.checkpoint.resume import step_folders
from sparsefusion.checkpoint.store import CheckpointError
from sparsefusion.config import load_yaml
from sparsefusion.interop.export_hf import export_hf, write_tokenizer
from sparsefusion.models.transformer import Transformer
from sparsefusion.runs.config import TrainConfig
from sparsefusion.runs.folder import (
    METRICS_FILE,
    config_path,
    is_run_folder,
    load_model,
    read_metrics,
    run_config,
)
from sparsefusion.runs.tokenizer import run_tokenizer

log = logging.getLogger("sparsefusion")


def load_run_model(run_dir: Path) -> tuple[Transformer, TrainConfig, Path]:
    """The run's model (newest valid checkpoint, eval mode), its TrainConfig and the checkpoint."""
    if not is_run_folder(run_dir):
        raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml)")
    if not step_folders(run_dir):
        raise CheckpointError(f"{run_dir} holds no complete checkpoint")
    cfg = run_config(run_dir)
    model, ckpt, _ = load_model(run_dir, cfg)
    return model, cfg, ckpt


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
    tokenizer = run_tokenizer(run_dir, cfg)
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

    run_dir = Path(run_dir)
    model, cfg, ckpt = load_run_model(run_dir)
    metrics = run_dir / METRICS_FILE
    rows = read_metrics(metrics) if metrics.is_file() else []
    config = load_yaml(config_path(run_dir))
    card = model_card(run_dir, config, rows, ckpt.name, model.cfg)
    out = Path(out) if out is not None else run_dir / "export-hub"
    to_hub_model(model, card).save_pretrained(out)
    try:
        run_tokenizer(run_dir, cfg).save(out / "tokenizer")
    except (OSError, ValueError) as e:  # the model folder is complete without it
        log.warning("export --format hub: the run's tokenizer was not written (%s)", e)
    return out
