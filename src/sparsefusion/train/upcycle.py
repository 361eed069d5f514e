"""Sparse upcycling (MoMa arXiv 2407.21770 section 2.5; spec 4.4).

At the start of a FRESH run with ``model.upcycle_from=PATH`` (a run folder or a checkpoint
folder of a dense, MoT or ``1t1i`` seed), every expert of a tower's group becomes a copy of the
seed's FFN for that tower (a one-tower seed FFN is copied into every group), every shared weight
is copied as it is, and the routers (experts, MoD) keep their fresh init. The trainer then keeps
the seed's data-loader position and starts the learning-rate schedule at step 0. A run that
already holds a checkpoint resumes from it and never copies again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sparsefusion.checkpoint.resume import step_folders
from sparsefusion.checkpoint.store import CheckpointError
from sparsefusion.checkpoint.weights import pick_checkpoint
from sparsefusion.models.transformer import Transformer
from sparsefusion.runs.folder import is_run_folder, run_config

_EXPERT = re.compile(r"^layers\.(\d+)\.feed_forward\.groups\.(\d+)\.(w13|w2)$")
_NEW = re.compile(r"(^layers\.\d+\.feed_forward\.groups\.\d+\.router$)|(^mod_routers\.)")


def seed_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder named by ``path`` (itself, or the newest one of a run folder)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    if not is_run_folder(path) or not step_folders(path):
        raise ValueError(f"model.upcycle_from={path}: no checkpoint (model.safetensors) found")
    with torch.device("meta"):  # shapes only: the newest checkpoint that passes validation
        seed_model = Transformer(run_config(path).model)
    try:
        return pick_checkpoint(path, seed_model)
    except CheckpointError as e:
        raise ValueError(f"model.upcycle_from={path}: {e}") from e


def upcycled_state_dict(
    model: Transformer, seed: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The model's state dict filled from a seed state dict (see the module docstring).

    Raises:
        ValueError: when a weight is missing from the seed or its shape does not match.
    """
    out = {}
    for name, current in model.state_dict().items():
        if _NEW.search(name):
            out[name] = current
            continue
        match = _EXPERT.match(name)
        src = _seed_ffn(seed, *match.groups()) if match else seed.get(name)
        if src is None:
            raise ValueError(f"model.upcycle_from: the seed has no weight for {name!r}")
        if match:
            src = src.unsqueeze(0).expand(current.shape[0], *src.shape).clone()
        if src.shape != current.shape:
            raise ValueError(
                f"model.upcycle_from: shape mismatch for {name!r}: seed {tuple(src.shape)}, "
                f"model {tuple(current.shape)} (same dim, layers, heads and FFN width needed)"
            )
        out[name] = src.to(current.dtype)
    return out


def _seed_ffn(seed: dict[str, torch.Tensor], layer: str, group: str, which: str):
    """The seed's FFN matrix ``which`` for tower ``group`` of ``layer`` (one expert), or None."""
    g = int(group)
    tower = seed.get(f"layers.{layer}.feed_forward.{which}.weight")  # TowerFFN: (G, out, in)
    if tower is None:  # a 1t1i / one-expert seed: groups.<g>.<which> is (1, out, in)
        key = f"layers.{layer}.feed_forward.groups.{{}}.{which}"
        groups = [seed[key.format(i)] for i in range(64) if key.format(i) in seed]
        if not groups:
            return None
        if any(w.shape[0] != 1 for w in groups):
            raise ValueError("model.upcycle_from: the seed already has several experts per group")
        tower = torch.cat(groups, dim=0)
    if tower.shape[0] == 1:
        return tower[0]
    if g >= tower.shape[0]:
        raise ValueError(
            f"model.upcycle_from: the seed has {tower.shape[0]} FFN towers, the model needs "
            f"tower {g} (tower counts must match, or the seed must have one FFN)"
        )
    return tower[g]


def upcycle(model: Transformer, path: str | Path) -> dict[str, Any]:
    """Copy a seed's weights into ``model`` (in place) and return the seed's train state.

    Args:
        model: the freshly initialised sparse model.
        path: run folder or checkpoint folder of the seed.

    Returns:
        The seed checkpoint's ``state.json`` mapping (its ``loader`` entry is the data position).
    """
    ckpt = seed_checkpoint(path)
    seed = load_file(str(ckpt / "model.safetensors"))
    model.load_state_dict(upcycled_state_dict(model, seed))
    return json.loads((ckpt / "state.json").read_text())
