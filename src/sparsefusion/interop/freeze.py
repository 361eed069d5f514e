"""``init.freeze=text``: train only what a pretrained LLM does not provide (LMFusion).

Frozen: the text tower's slice of every per-tower weight (Q/K/V/O, FFN, sublayer norms; the text
group of an expert FFN), every weight all towers share (the final norm; shared attention of MoMa
or of ``untie_attention=false``) and the LLM's rows of the embedding and output tables. Trained:
the other towers, routers, Transfusion's patch layers and the new rows (sentinels, image codes).

A whole frozen parameter gets ``requires_grad=False`` (the optimizer never sees it). A frozen
*slice* of a trained parameter (one tower of a (G, ...) weight, some rows of a table) has its
gradient zeroed by a hook (so it adds nothing to the clipped gradient norm or to Adam's moments)
and is written back after every optimizer step (decoupled weight decay would otherwise shrink it):
the frozen values stay bit-identical. They are snapshotted before the first step, i.e. after the
trainer has loaded a checkpoint when resuming. Single process and DDP; not FSDP (its sharded
parameters replace the ones hooked here: ``resolve_init`` refuses the combination).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from sparsefusion.interop.load import RowMap
from sparsefusion.models.transformer import Transformer
from sparsefusion.nn.norms import TowerRMSNorm
from sparsefusion.nn.tower_linear import TowerLinear

_DEAD: list = []  # hook handles of models that are gone
_GROUP = re.compile(r"feed_forward\.groups\.(\d+)\.")
_NEW = re.compile(r"(\.router$)|(^mod_routers\.)|(^patch_embed\.)|(^patch_head\.)")


@dataclass
class FrozenSlices:
    """Parameters with frozen parts: ``(param, index)`` pairs and their snapshots."""

    parts: list[tuple[nn.Parameter, tuple]] = field(default_factory=list)
    saved: list[torch.Tensor] | None = None

    def snapshot(self) -> None:
        self.saved = [p.detach()[_on(index, p)].clone() for p, index in self.parts]

    @torch.no_grad()
    def restore(self) -> None:
        assert self.saved is not None
        for (p, index), value in zip(self.parts, self.saved, strict=True):
            p[_on(index, p)] = value

    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        ids = {id(p) for p, _ in self.parts}
        return any(id(p) in ids for g in optimizer.param_groups for p in g["params"])


def frozen_parts(model: Transformer, rows: RowMap) -> tuple[list[str], list[tuple[str, tuple]]]:
    """Names of wholly frozen parameters, and (name, index) of frozen slices.

    Args:
        model: the decoder (any arch).
        rows: where the LLM's vocabulary rows are (``interop.init.text_rows``).
    """
    cfg = model.cfg
    text_tower = cfg.tower_of_modality[cfg.modalities.index("text")]
    towers_of = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, TowerLinear | TowerRMSNorm):
            towers_of[mod_name] = module.num_towers
    whole, sliced = [], []
    for name, _ in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        group = _GROUP.search(name)
        if name in ("embedding.weight", "output.weight"):
            sliced.append((name, _row_index(rows)))
        elif _NEW.search(name) and not (group and int(group.group(1)) == text_tower):
            continue
        elif group:
            if int(group.group(1)) == text_tower:
                whole.append(name)
        elif towers_of.get(owner, 1) > 1:
            sliced.append((name, (text_tower,)))
        else:
            whole.append(name)
    return whole, sliced


def _on(index: tuple, like: torch.Tensor) -> tuple:
    """The index with its tensors on ``like``'s device."""
    return tuple(i.to(like.device) if torch.is_tensor(i) else i for i in index)


def _row_index(rows: RowMap) -> tuple:
    ids = list(range(rows.offset, rows.offset + rows.count)) + [r for r, _ in rows.extra]
    return (torch.tensor(sorted(ids)),)


def freeze_text(model: Transformer, rows: RowMap) -> FrozenSlices:
    """Freeze the LLM's part of ``model`` (see the module docstring); returns the slices kept."""
    whole, sliced = frozen_parts(model, rows)
    params = dict(model.named_parameters())
    for name in whole:
        params[name].requires_grad_(False)
    frozen = FrozenSlices()
    for name, index in sliced:
        p = params[name]
        p.register_hook(_zero_grad_at(index))
        frozen.parts.append((p, index))
    _register(frozen)
    model._frozen_text = frozen  # lives as long as the model (the hooks hold weak references)
    return frozen


def _zero_grad_at(index: tuple):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[_on(index, grad)] = 0
        return grad

    return hook


def _register(frozen: FrozenSlices) -> None:
    """Snapshot before the first step of an optimizer holding these parameters; restore after
    every step. Hooks of a model that is gone do nothing and are removed at the next
    registration (not while torch iterates over the hooks)."""
    while _DEAD:
        _DEAD.pop().remove()
    ref = weakref.ref(frozen)
    handles: list = []

    def live() -> FrozenSlices | None:
        target = ref()
        if target is None and handles:  # the model is gone
            _DEAD.extend(handles)
            handles.clear()
        return target

    def pre(optimizer, args, kwargs):
        target = live()
        if target is not None and target.saved is None and target.owns(optimizer):
            if any(type(p).__name__ == "DTensor" for p, _ in target.parts):
                raise ValueError("init.freeze=text is not supported with FSDP (dist.strategy)")
            target.snapshot()

    def post(optimizer, args, kwargs):
        target = live()
        if target is not None and target.saved is not None and target.owns(optimizer):
            target.restore()

    handles += [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
