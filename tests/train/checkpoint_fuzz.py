"""Checkpoint mutations for property tests (hypothesis) and ``benchmarks/fuzz_checkpoints.py``.

A mutation damages one file of a checkpoint folder: bytes (truncation, a flipped byte), the JSON
of ``state.json`` (a key added, removed or renamed, a value replaced by one of another type) or
the tensors of a safetensors file (one added, removed or renamed, reshaped, cast to another
dtype, or holding NaN / inf). The property every reader must keep: it uses the newest valid
checkpoint (the older one, or the mutated one when the mutation left it valid); never an error,
a traceback or a hang (the older checkpoint is always valid, so there is always a fallback).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

FILES = ("model.safetensors", "optim.safetensors", "state.json")
DTYPES = (torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.int32)
COMMON = ("run.progress=log", "run.log_every=1", "run.eval_every=0", "run.save_every=2",
          "train.steps=7", "train.threads=1", "run.tensorboard=false")  # fmt: skip


@dataclass(frozen=True)
class Mutation:
    """One damage to one file; ``pick`` and ``value`` select what (modulo what the file holds)."""

    file: str
    kind: str
    pick: int = 0
    value: Any = None

    def apply(self, folder: Path) -> None:
        path = folder / self.file
        if self.kind == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[: self.pick % max(1, len(data))])
        elif self.kind == "flip":
            data = bytearray(path.read_bytes())
            data[self.pick % len(data)] ^= self.value
            path.write_bytes(bytes(data))
        elif self.file == "state.json":
            state = json.loads(path.read_text())
            state = _mutate_json(state, self.kind, self.pick, self.value)
            path.write_text(json.dumps(state))
        else:
            tensors = load_file(str(path))
            _mutate_tensors(tensors, self.kind, self.pick, self.value)
            save_file(tensors, str(path))


def _json_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Paths to every dict entry and the first three items of every list."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _json_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node[:3]):
            out += _json_paths(value, (*prefix, i))
    return out


def _other_type(old: Any, value: Any) -> Any:
    """``value``, or a replacement when it has the type of ``old`` (a *type* change)."""
    if type(value) is not type(old):
        return value
    return "x" if not isinstance(old, str) else 1


def _mutate_json(state: Any, kind: str, pick: int, value: Any) -> Any:
    paths = _json_paths(state)
    path = paths[pick % len(paths)]
    parent = state
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if kind == "retype":
        parent[last] = _other_type(parent[last], value)
    elif kind == "remove":
        parent.pop(last)
    elif kind == "rename" and isinstance(parent, dict):
        parent[f"{last}_"] = parent.pop(last)
    elif kind == "add":
        target = parent[last] if isinstance(parent[last], dict) else parent
        if isinstance(target, dict):
            target[f"k{pick % 97}_"] = value
        else:
            target.append(value)
    return state


def _mutate_tensors(tensors: dict[str, torch.Tensor], kind: str, pick: int, value: Any) -> None:
    names = sorted(tensors)
    name = names[pick % len(names)]
    if kind == "add":
        tensors[f"{name}.extra{pick % 7}"] = torch.zeros(2)
    elif kind == "remove":
        del tensors[name]
    elif kind == "rename":
        tensors[name + "_"] = tensors.pop(name)
    elif kind == "reshape":
        flat = tensors[name].flatten()
        tensors[name] = flat[:-1].clone() if flat.numel() > 1 else torch.cat([flat, flat])
    elif kind == "dtype":
        dtype = value if value != tensors[name].dtype else torch.float64
        tensors[name] = tensors[name].to(dtype)
    elif kind == "nonfinite":
        floats = [n for n in names if tensors[n].is_floating_point()]
        name = floats[pick % len(floats)]
        t = tensors[name].clone()
        t.view(-1)[pick % t.numel()] = value
        tensors[name] = t


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(-3, 3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
)


@st.composite
def mutations(draw) -> Mutation:
    """A random damage to the file of a checkpoint folder."""
    file = draw(st.sampled_from(FILES))
    pick = draw(st.integers(0, 2**31))
    byte_kinds = ["truncate", "flip"]
    if file == "state.json":
        kinds = [*byte_kinds, "retype", "retype", "add", "remove", "rename"]
    else:
        kinds = [*byte_kinds, "add", "remove", "rename", "reshape", "dtype", "nonfinite"]
    kind = draw(st.sampled_from(kinds))
    if kind in byte_kinds:
        value = draw(st.integers(1, 255))  # the XOR mask of a flip
    elif file == "state.json":
        value = draw(JSON_VALUES)
    elif kind == "dtype":
        value = draw(st.sampled_from(DTYPES))
    elif kind == "nonfinite":
        value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    else:
        value = None
    return Mutation(file, kind, pick, value)


def train_config(run_dir: Path, cache: str, *extra: str):
    from sparsefusion.runs.presets import resolve_config

    return resolve_config(
        "mot-debug", [f"run.dir={run_dir}", f"tokenizer.cache_dir={cache}", *COMMON, *extra]
    )


def base_run(run_dir: Path, cache: str) -> Path:
    """A ``mot-debug`` run stopped after step 6: checkpoints step_4 and step_6."""
    from sparsefusion.train.trainer import train

    train(train_config(run_dir, cache, "train.stop_at=6"))
    return run_dir


class _Hang(BaseException):  # not an Exception: no reader may swallow it
    pass


def _with_alarm(seconds: int, fn):
    def hung(*_):
        raise _Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_resume(base: Path, work: Path, cache: str, mutation: Mutation) -> str:
    """Resume a copy of ``base`` whose newest checkpoint is mutated; returns the outcome."""
    from sparsefusion.checkpoint.store import checkpoint_dir
    from sparsefusion.runs.folder import read_metrics
    from sparsefusion.train.trainer import train

    shutil.rmtree(work, ignore_errors=True)
    run_dir = shutil.copytree(base, work)
    mutation.apply(checkpoint_dir(run_dir) / "step_00000006")
    logging.getLogger("sparsefusion").setLevel(logging.ERROR)
    _with_alarm(300, lambda: train(train_config(run_dir, cache)))  # any error fails the property
    rows = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r]
    assert rows == list(range(1, 8)), rows
    damaged = (checkpoint_dir(run_dir) / "damaged_step_00000006").is_dir()
    return "fell back to step 4" if damaged else "resumed from step 6 (still valid)"


def check_pick(base_mutated: Path, model: Any) -> str:
    """``pick_checkpoint`` + ``load_weights`` (eval, export, generate, serve) on a mutated run."""
    from sparsefusion.checkpoint.weights import load_weights, pick_checkpoint

    ckpt = _with_alarm(120, lambda: pick_checkpoint(base_mutated, model))  # any error fails
    load_weights(ckpt, model)
    assert ckpt.name in ("step_00000004", "step_00000006"), ckpt
    return f"chose {ckpt.name}"
