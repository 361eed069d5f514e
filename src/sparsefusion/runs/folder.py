"""A run folder: where each file lives, and how every command opens one.

A run folder (``run.dir``) holds ``config.yaml`` (the resolved config), ``tokenizer/`` (the
tokenizer the run trained with), ``checkpoints/step_<N>/``, ``metrics.jsonl``, ``train.log``,
``tb/`` and, after ``sparsefusion train-aux``, ``aux_routers/``. The trainer writes it; train-aux,
upcycling, sweep, eval, export, generate and serve open it through the functions here, so all of
them choose and validate checkpoints the same way (the newest valid one, damaged newer ones
skipped with a warning) and read the same files.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sparsefusion.checkpoint.resume import step_folders
from sparsefusion.checkpoint.store import CheckpointError, append_row, write_atomic
from sparsefusion.checkpoint.weights import load_weights, pick_checkpoint
from sparsefusion.config import dump_yaml, from_dict, load_yaml, to_dict
from sparsefusion.data.prefetch import LOADING_KEYS
from sparsefusion.models.transformer import Transformer
from sparsefusion.nn.aux_router import AuxRouters
from sparsefusion.runs.config import TrainConfig

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
AUX_DIR = "aux_routers"
AUX_ROUTERS_FILE = Path(AUX_DIR) / "aux_routers.safetensors"


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


def is_run_folder(run_dir: str | Path) -> bool:
    return config_path(run_dir).is_file()


def run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved config of a run folder (ValueError when it is not one)."""
    path = config_path(run_dir)
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run folder (no {CONFIG_FILE})")
    return from_dict(TrainConfig, load_yaml(path))


def write_config(run_dir: str | Path, cfg: TrainConfig) -> None:
    """Write the resolved config (atomically: a full disk leaves the previous file whole).

    Raises:
        DiskWriteError: the file could not be written (the message names it).
    """
    write_atomic(config_path(run_dir), lambda tmp: dump_yaml(cfg, tmp))


def refuse_lost_history(run_dir: str | Path, save_every: int) -> None:
    """Refuse to train in a run folder whose checkpoints are gone but whose metrics show that
    one was written (a row at or past step ``save_every``, the first save).

    Starting again at step 0 there would truncate ``metrics.jsonl`` (the run's history) and,
    later, replace its checkpoints. A run killed before its first checkpoint has nothing to lose
    and starts again as before. Damaged checkpoints count as present: the resume check reports
    them.

    Raises:
        ValueError: the folder has such metrics rows and no ``checkpoints/step_*`` folder.
    """
    metrics = Path(run_dir) / METRICS_FILE
    if step_folders(Path(run_dir)):
        return
    last = last_logged_step(run_dir)
    if last is None or last < save_every:
        return
    raise ValueError(
        f"{run_dir} holds the metrics of an earlier run up to step {last} ({metrics}) but no "
        "checkpoint to resume from (checkpoints/ is gone); refusing to start over at step 0 and "
        "overwrite its history. To start over, use another run.dir or delete the folder"
    )


def last_logged_step(run_dir: str | Path) -> int | None:
    """The largest ``step`` of the run's ``metrics.jsonl`` rows (None: no file or no rows; a
    half-written row is skipped)."""
    metrics = Path(run_dir) / METRICS_FILE
    if not metrics.is_file():  # a FIFO or folder named metrics.jsonl is not read
        return None
    last = None
    with metrics.open("rb") as f:
        for line in f:
            with contextlib.suppress(ValueError, AttributeError):
                step = json.loads(line).get("step")
                if isinstance(step, int) and (last is None or step > last):
                    last = step
    return last


# The objective keys that decide what the weights were trained to predict (a run resumed with
# another ``image_loss`` would regress the velocity with a noise predictor, or the reverse).
RESUME_OBJECTIVE_KEYS = ("name", "image_loss")


def check_resume_config(run_dir: str | Path, cfg: TrainConfig) -> None:
    """Refuse to resume a run whose model, data or tokenizer settings, or whose objective
    (``objective.name``, ``objective.image_loss``), changed."""
    path = config_path(run_dir)
    if not path.exists() or not step_folders(Path(run_dir)):
        return
    old = load_yaml(path)
    with contextlib.suppress(ValueError):  # keys added since then compare at their defaults
        old = to_dict(from_dict(TrainConfig, old))
    new = to_dict(cfg)
    for d in (old.get("data", {}), new["data"]):  # how batches are loaded, not which ones
        for key in LOADING_KEYS:
            d.pop(key, None)
    for d in (old.get("tokenizer", {}), new["tokenizer"]):  # the run keeps its own tokenizer
        d.pop("cache_dir", None)
    _check_resume_objective(path, old.get("objective", {}), new["objective"])
    for section in ("model", "data", "tokenizer"):
        if old.get(section) != new.get(section):
            changed = ", ".join(
                f"{key}: {a!r} -> {b!r}"
                for key, a, b in _differences(old.get(section), new.get(section), section)
            )
            raise ValueError(
                f"{path}: the run folder holds a checkpoint trained with different '{section}' "
                f"settings ({changed}); use another run.dir or the same config"
            )


def _check_resume_objective(path: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse a change of :data:`RESUME_OBJECTIVE_KEYS` (a key the old config lacks compares
    at its default)."""
    defaults = to_dict(TrainConfig())["objective"]
    for key in RESUME_OBJECTIVE_KEYS:
        was, now = old.get(key, defaults[key]), new[key]
        if was != now:
            raise ValueError(
                f"{path}: the run folder holds a checkpoint trained with objective.{key}={was} "
                f"(now objective.{key}={now}); use another run.dir or objective.{key}={was}"
            )


def _differences(old: Any, new: Any, where: str) -> list[tuple[str, Any, Any]]:
    """The dotted keys whose values differ between two config trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{where}.{key}")
        return out
    return [] if old == new else [(where, old, new)]


def load_model(
    run_dir: str | Path,
    cfg: TrainConfig,
    step: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Transformer, Path, dict[str, Any]]:
    """The model of checkpoint ``step`` (the newest valid one when None) in eval mode, frozen,
    its checkpoint folder and its saved counters (``state.json``).

    Raises:
        CheckpointError: no usable checkpoint, or the named one is missing or damaged.
    """
    model = Transformer(cfg.model)
    ckpt = pick_checkpoint(Path(run_dir), model, step)
    load_weights(ckpt, model)
    state = json.loads((ckpt / "state.json").read_text())
    return model.to(device).eval().requires_grad_(False), ckpt, state


def aux_routers_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / AUX_ROUTERS_FILE


def load_aux_routers(
    run_dir: str | Path, model: Transformer, device: torch.device | str = "cpu"
) -> tuple[AuxRouters | None, str]:
    """The run's auxiliary routers (eval mode, frozen), or ``(None, why they are missing)``."""
    path = aux_routers_path(run_dir)
    if not path.is_file():
        return None, (
            f"no auxiliary routers ({path} missing; run `sparsefusion train-aux {run_dir}`)"
        )
    aux = AuxRouters(model.cfg.dim, model.router_sites())
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        return None, f"auxiliary routers {path} are unreadable or truncated ({e})"
    try:
        aux.load_state_dict(tensors, strict=True)
    except (RuntimeError, ValueError) as e:
        return None, f"auxiliary routers {path} do not fit this model ({e})"
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        return None, f"auxiliary routers {path} hold non-finite values ({bad[:3]})"
    return aux.to(device).eval().requires_grad_(False), ""


def save_aux_routers(run_dir: str | Path, aux: AuxRouters, row: dict[str, Any]) -> Path:
    """Write the routers and append their validation row to ``aux_routers/metrics.jsonl``."""
    out = Path(run_dir) / AUX_DIR
    out.mkdir(exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in aux.state_dict().items()}
    write_atomic(aux_routers_path(run_dir), lambda tmp: save_file(state, str(tmp)))
    append_row(out / METRICS_FILE, row)
    return aux_routers_path(run_dir)


def require_checkpoint(run_dir: str | Path) -> None:
    """ValueError unless ``run_dir`` holds a config and at least one complete checkpoint."""
    if not is_run_folder(run_dir) or not step_folders(Path(run_dir)):
        raise ValueError(f"{run_dir} holds no finished run ({CONFIG_FILE} and a checkpoint)")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file; a malformed line raises ValueError naming file and line."""
    rows = []
    with Path(path).open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed metrics row: {e}") from e
    return rows


__all__ = [
    "AUX_ROUTERS_FILE",
    "CONFIG_FILE",
    "CheckpointError",
    "aux_routers_path",
    "check_resume_config",
    "config_path",
    "is_run_folder",
    "last_logged_step",
    "load_aux_routers",
    "load_model",
    "read_metrics",
    "refuse_lost_history",
    "require_checkpoint",
    "run_config",
    "save_aux_routers",
    "write_config",
]
