"""Export a run's newest checkpoint as one safetensors file plus its config.

``sparsefusion export RUN_DIR [--out PATH]`` reads either checkpoint format (single-process
safetensors or sharded DCP, gathered here in one process) and writes ``PATH/model.safetensors``
and ``PATH/config.yaml`` (default ``PATH``: ``RUN_DIR/export``). :func:`load_exported` builds the
model back from those two files with safetensors alone: no torch.distributed, no unpickling.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from sparsefusion.checkpoint.resume import step_folders
from sparsefusion.checkpoint.store import (
    CheckpointError,
    DiskWriteError,
    write_atomic,
    write_error_message,
)
from sparsefusion.config import from_dict, load_yaml
from sparsefusion.models.transformer import ModelConfig, Transformer
from sparsefusion.runs.folder import CONFIG_FILE, config_path, load_model, run_config


def export_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the newest checkpoint of ``run_dir`` as ``out/model.safetensors`` + ``config.yaml``.

    Returns:
        The output folder.

    The newest checkpoint that passes validation is used (damaged newer ones are skipped with a
    warning, see ``checkpoint/resume.py``).

    Raises:
        CheckpointError: when the run has no usable checkpoint or it does not match its config.
        DiskWriteError: an output file could not be written (full disk); the message names it.
    """
    run_dir = Path(run_dir)
    if not step_folders(run_dir):
        raise CheckpointError(f"{run_dir} holds no complete checkpoint")
    try:
        cfg = run_config(run_dir)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_path(run_dir)}: not a usable run config ({e})") from e
    model, ckpt, _ = load_model(run_dir, cfg)  # the newest valid checkpoint
    out = Path(out) if out is not None else run_dir / "export"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiskWriteError(write_error_message(out, e)) from e
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"checkpoint": ckpt.name}
    # Each file is written whole or not at all (a full disk leaves the previous export intact).
    write_atomic(out / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    config = config_path(run_dir).read_text()
    write_atomic(out / CONFIG_FILE, lambda tmp: tmp.write_text(config))
    return out


def load_exported(path: str | Path) -> Transformer:
    """The model of an exported folder (``model.safetensors`` + ``config.yaml``), in eval mode."""
    path = Path(path)
    config = load_yaml(path / CONFIG_FILE)
    model = Transformer(from_dict(ModelConfig, config["model"], where="model"))
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.eval()
