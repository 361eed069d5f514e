"""What a valid checkpoint holds: the schema every reader checks before trusting one.

A checkpoint is valid when it can be loaded into the model (and optimizer) at hand *and* its
contents make sense, not merely when its files parse:

- ``state.json``: a regular file holding a JSON object with exactly the keys a save writes
  (``step`` equal to the folder's, non-negative integer counters, finite non-negative numbers,
  the data-loader state in the structure ``data/shards.py`` and ``data/loader.py`` produce,
  optimizer param groups whose indices cover the optimizer's parameters once each).
- ``model.safetensors``: every tensor name, shape and dtype of the model, and finite values.
- ``optim.safetensors``: only ``optim.<index>.<step|exp_avg|exp_avg_sq|max_exp_avg_sq>`` and
  ``rng.*`` tensors; each index a parameter of the param groups with the complete AdamW state;
  moments of the parameter's shape and dtype, finite (second moments non-negative); the RNG
  state of this torch's size.
- Both tensor files byte for byte as saved: ``state.json`` records their SHA-256 (checked last,
  so a readable but wrong tensor is reported by what is wrong with it; absent in older
  checkpoints). ``state.json`` also records the SHA-256 of its own other contents, so an edit
  that leaves valid JSON of the right shape (a digit of the loader's token buffer changed, which
  would feed an out-of-range token id to the embedding) is caught too (absent in older ones).
- DCP checkpoints: ``.metadata`` names and shapes (and dtypes) of the model, shard files long
  enough, one valid loader state per data stream. Their tensors are not read here (that would
  need the whole DCP load); ``checkpoint/dcp.py`` checks their values are finite as it loads
  them, and refuses the checkpoint (naming the tensor) otherwise.

Cost: a single-process checkpoint's tensors are read once (memory-mapped) for the finite check
and its files once more for the SHA-256 (about 1 GB/s): roughly twice the time of loading it,
fine for the model sizes one process trains (a 100M-parameter model with AdamW state, 1.2 GB,
takes a few seconds).

Only regular files are opened (a FIFO or a device named ``state.json`` would block a reader).

Shape legend: none.
"""

from __future__ import annotations

import json
import math
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from sparsefusion.checkpoint.store import DIGESTED, SELF_DIGEST, file_digest, state_digest

# The keys a save writes into state.json (single-process, then DCP's additions); older
# checkpoints may lack the optional ones.
_REQUIRED = {"step": "int", "tokens": "int", "flops": "number", "param_groups": "list"}
_OPTIONAL = {"skipped_steps": "int", "elapsed_s": "number", "digests": "dict", SELF_DIGEST: "str"}
_SINGLE = {"loader": "dict"}
_DCP = {"format": "str", "world_size": "int", "num_data_shards": "int"}
_ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")
_OPTIM_KEY = re.compile(r"^optim\.(0|[1-9]\d{0,8})\.(step|exp_avg|exp_avg_sq|max_exp_avg_sq)$")
_GROUP_NUMBERS = ("lr", "weight_decay", "eps")
_GROUP_REQUIRED = ("lr", "betas", "eps", "weight_decay")  # torch gives these no default on load
_GROUP_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable", "decoupled_weight_decay")


class Damaged(Exception):
    """The checkpoint cannot be trusted (the message says what is wrong)."""


class Mismatch(Exception):
    """The checkpoint is readable but holds another model's weights (names or shapes)."""


@dataclass(frozen=True)
class CheckpointSpec:
    """What a checkpoint must hold to load into a model (and, when given, its optimizer).

    Attributes:
        tensors: model state-dict name -> (shape, dtype).
        params: the optimizer's parameters in index order -> (shape, dtype); None to check
            optimizer tensors only against each other (inference readers).
        group_sizes: parameters per optimizer param group (with ``params``).
        group_keys: hyperparameters every saved param group must hold (the optimizer's).
    """

    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]
    params: tuple[tuple[tuple[int, ...], torch.dtype], ...] | None = None
    group_sizes: tuple[int, ...] | None = None
    group_keys: frozenset[str] = frozenset()

    def with_optimizer(self, optimizer: torch.optim.Optimizer) -> CheckpointSpec:
        """This spec, plus ``optimizer``'s parameters (built over the model's, wrapped or not)."""
        groups = optimizer.param_groups
        params = tuple((tuple(p.shape), p.dtype) for g in groups for p in g["params"])
        sizes = tuple(len(g["params"]) for g in groups)
        keys = frozenset(k for g in groups for k in g if k in _GROUP_REQUIRED)
        return CheckpointSpec(self.tensors, params, sizes, keys)


def checkpoint_spec(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> CheckpointSpec:
    """The spec of an unwrapped ``model`` (and of ``optimizer``, built over its parameters)."""
    spec = CheckpointSpec({k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()})
    return spec if optimizer is None else spec.with_optimizer(optimizer)


def check_single(path: Path, spec: CheckpointSpec) -> None:
    """Validate a single-process checkpoint folder.

    Raises:
        Damaged: a file is missing, unreadable or holds invalid contents.
        Mismatch: the weights' names or shapes are another model's.
    """
    state = read_state(path, dcp=False)
    check_loader_state(state["loader"], "state.json")
    num_params = _check_param_groups(state["param_groups"], spec, ints=True)
    model_file, optim_file = path / "model.safetensors", path / "optim.safetensors"
    with _Tensors(model_file) as weights, _Tensors(optim_file) as extra:
        saved = {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}
        try:
            compare_shapes(saved, spec)
        except Mismatch as e:  # another architecture, unless the file changed after the save
            if _changed(path, state.get("digests"), "model.safetensors"):
                raise Damaged(f"model.safetensors is not the file that was saved ({e})") from e
            raise
        _check_weights(weights, spec)
        _check_optim(extra, spec, num_params)
    _check_digests(path, state.get("digests"))


def _changed(path: Path, digests: Any, name: str) -> bool:
    """True when ``state.json`` records a digest of file ``name`` that it no longer has."""
    want = digests.get(name) if isinstance(digests, dict) else None
    return isinstance(want, str) and _digest(path / name) != want


def _digest(file: Path) -> str:
    try:
        return file_digest(file)
    except OSError as e:
        raise Damaged(f"{file.name} is unreadable ({e})") from e


def _check_digests(path: Path, digests: dict[str, Any] | None) -> None:
    """The tensor files are the bytes the save wrote (checked last, so that a readable but wrong
    tensor is reported by what is wrong with it). Older checkpoints have no digests."""
    if digests is None:
        return
    if set(digests) != set(DIGESTED) or not all(
        isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in digests.values()
    ):
        raise Damaged("state.json has malformed 'digests'")
    for name, want in digests.items():
        if _digest(path / name) != want:
            raise Damaged(f"{name} is not the file that was saved (its SHA-256 differs)")


def read_state(path: Path, *, dcp: bool) -> dict[str, Any]:
    """``state.json`` of checkpoint folder ``path``, its keys and types checked."""
    state = read_json(path / "state.json")
    if not isinstance(state, dict):
        raise Damaged("state.json is not a JSON object")
    if SELF_DIGEST in state and state[SELF_DIGEST] != state_digest(state):
        raise Damaged("state.json is not the file that was saved (its own SHA-256 differs)")
    keys = {**_REQUIRED, **(_DCP if dcp else _SINGLE)}
    unknown = sorted(set(state) - set(keys) - set(_OPTIONAL))
    if unknown:
        raise Damaged(f"state.json has unexpected keys {unknown[:3]}")
    for key in keys:
        if key not in state:
            raise Damaged(f"state.json has no {key!r}")
    for key, kind in {**keys, **_OPTIONAL}.items():
        if key in state:
            _expect(state[key], kind, f"state.json {key!r}")
    step = int(path.name[5:])
    if state["step"] != step:
        raise Damaged(f"state.json has step {state['step']!r}, the folder is step {step}")
    if dcp and (state["format"] != "dcp" or state["num_data_shards"] < 1):
        raise Damaged("state.json has an invalid format or num_data_shards")
    return state


def read_json(file: Path) -> Any:
    """Parse a JSON file that must be a regular file (never blocks on a FIFO)."""
    name = file.name
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        raise Damaged(f"{name} is missing (the save did not complete)") from None
    except OSError as e:
        raise Damaged(f"{name} is unreadable ({e})") from e
    if not stat.S_ISREG(mode):
        raise Damaged(f"{name} is not a regular file")
    try:
        return json.loads(file.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise Damaged(f"{name} is unreadable ({type(e).__name__}: {e})") from e


def check_loader_state(loader: Any, where: str) -> None:
    """The data-loader state as ``ShardedLoaders.state_dict`` writes it (or one loader's)."""
    if isinstance(loader, dict) and "version" in loader:  # a plain PackedLoader state
        loader = {"num_shards": 1, "shards": {"0": loader}}
    if not isinstance(loader, dict) or set(loader) != {"num_shards", "shards"}:
        raise Damaged(f"{where} has no valid data-loader state")
    num, shards = loader["num_shards"], loader["shards"]
    if not _is_int(num) or num < 1 or not isinstance(shards, dict) or not shards:
        raise Damaged(f"{where} has a malformed data-loader state (num_shards, shards)")
    for key, shard in shards.items():
        if not key.isdigit() or int(key) >= num:
            raise Damaged(f"{where} has a data-loader state for an unknown shard {key!r}")
        check_shard_state(shard, f"{where} loader shard {key}", rank=int(key), world_size=num)


def check_shard_state(shard: Any, where: str, *, rank: int | None, world_size: int | None) -> None:
    """One ``PackedLoader`` state (``data/loader.py``): counters and the carried-over buffer."""
    from sparsefusion.data.loader import STATE_VERSION

    if not isinstance(shard, dict):
        raise Damaged(f"{where} is not an object")
    for key in ("version", "rank", "world_size", "docs_read", "tokens_emitted"):
        if not _is_int(shard.get(key)) or shard[key] < 0:
            raise Damaged(f"{where} has no valid {key!r}")
    expect = {"version": STATE_VERSION, "rank": rank, "world_size": world_size}
    for key, value in expect.items():
        if value is not None and shard[key] != value:
            raise Damaged(f"{where} has {key}={shard[key]}, expected {value}")
    for key in ("padding_tokens", "images"):
        if key in shard and (not _is_int(shard[key]) or shard[key] < 0):
            raise Damaged(f"{where} has an invalid {key!r}")
    for key in ("modality_tokens", "skipped"):
        counts = shard.get(key, {})
        if not isinstance(counts, dict) or not all(_is_int(v) and v >= 0 for v in counts.values()):
            raise Damaged(f"{where} has an invalid {key!r}")
    if not all(k.isdigit() for k in shard.get("modality_tokens", {})):
        raise Damaged(f"{where} has an invalid 'modality_tokens'")
    _check_buffer(shard.get("buffer"), where)


def _check_buffer(buffer: Any, where: str) -> None:
    if not isinstance(buffer, dict):
        raise Damaged(f"{where} has no valid 'buffer'")
    if "pending" in buffer:  # the former Transfusion loader: (document, cursor) pairs
        pairs = buffer["pending"]
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(_is_int(x) for x in p) for p in pairs
        ):
            raise Damaged(f"{where} has an invalid buffer 'pending'")
        return
    fields = ("ids", "modality", "position", "document")
    columns = [buffer.get(k) for k in fields]
    if not all(isinstance(c, list) and all(_is_int(x) for x in c) for c in columns):
        raise Damaged(f"{where} has an invalid buffer (lists of integers {fields})")
    if len({len(c) for c in columns}) != 1:
        raise Damaged(f"{where} has buffer fields of different lengths")
    values_of = buffer.get("values_of", [])
    if not isinstance(values_of, list) or not all(_is_int(x) for x in values_of):
        raise Damaged(f"{where} has an invalid buffer 'values_of'")
    unknown = set(buffer) - {*fields, "values_of"}
    if unknown:
        raise Damaged(f"{where} has unexpected buffer keys {sorted(unknown)[:3]}")


def _check_param_groups(groups: list, spec: CheckpointSpec, *, ints: bool) -> int:
    """Validate the optimizer param groups; returns the number of parameters they list."""
    listed: list = []
    for i, group in enumerate(groups):
        where = f"state.json param_groups[{i}]"
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise Damaged(f"{where} is malformed (no 'params' list)")
        if not all(_is_int(p) and p >= 0 if ints else isinstance(p, str) for p in group["params"]):
            raise Damaged(f"{where} 'params' are not {'indices' if ints else 'names'}")
        for key in _GROUP_NUMBERS:
            if key in group and not _finite_number(group[key]):
                raise Damaged(f"{where} has an invalid {key!r}")
        lacking = sorted(({"lr"} | spec.group_keys) - set(group))
        if lacking:
            raise Damaged(f"{where} has no {lacking}")
        betas = group.get("betas", [0.9, 0.999])
        if not isinstance(betas, list) or len(betas) != 2 or not all(map(_finite_number, betas)):
            raise Damaged(f"{where} has invalid 'betas'")
        for key in _GROUP_FLAGS:
            if key in group and not isinstance(group[key], bool):
                raise Damaged(f"{where} has an invalid {key!r}")
        for key in ("foreach", "fused"):
            if group.get(key) is not None and not isinstance(group[key], bool):
                raise Damaged(f"{where} has an invalid {key!r}")
        listed += group["params"]
    if len(set(listed)) != len(listed) or (ints and sorted(listed) != list(range(len(listed)))):
        raise Damaged("state.json param_groups list parameters twice or skip some")
    if spec.group_sizes is not None and tuple(len(g["params"]) for g in groups) != tuple(
        spec.group_sizes
    ):
        sizes = [len(g["params"]) for g in groups]
        want = list(spec.group_sizes)
        raise Damaged(f"state.json param_groups hold {sizes} parameters, the optimizer {want}")
    return len(listed)


class _Tensors:
    """``safe_open`` of a regular safetensors file, errors as :class:`Damaged`."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def __enter__(self) -> Any:
        name = self.file.name
        try:
            mode = self.file.stat().st_mode
        except OSError:
            raise Damaged(f"{name} is missing") from None
        if not stat.S_ISREG(mode):
            raise Damaged(f"{name} is not a regular file")
        try:
            self.handle = safe_open(str(self.file), "pt")
            return self.handle.__enter__()
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise Damaged(f"{name} is unreadable or truncated ({e})") from e

    def __exit__(self, *exc: Any) -> None:
        self.handle.__exit__(*exc)


def _get(f: Any, key: str, file: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise Damaged(f"{file} tensor {key} is unreadable ({e})") from e


def _check_weights(f: Any, spec: CheckpointSpec) -> None:
    for key, (_, dtype) in spec.tensors.items():
        value = _get(f, key, "model.safetensors")
        if value.dtype != dtype:
            raise Damaged(f"model.safetensors {key} is {value.dtype}, the model {dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise Damaged(f"model.safetensors {key} holds non-finite values (NaN or inf)")


def _check_optim(f: Any, spec: CheckpointSpec, num_params: int) -> None:
    names: dict[int, set[str]] = {}
    for key in f.keys():
        if key.startswith("rng."):
            _check_rng(key, _get(f, key, "optim.safetensors"))
            continue
        match = _OPTIM_KEY.match(key)
        if match is None:
            raise Damaged(f"optim.safetensors holds an unexpected tensor {key!r}")
        index, name = int(match[1]), match[2]
        if index >= num_params:
            raise Damaged(f"optim.safetensors holds state for an unknown parameter {key!r}")
        names.setdefault(index, set()).add(name)
        _check_moment(key, name, _get(f, key, "optim.safetensors"), spec, index)
    if "rng.cpu" not in f.keys():
        raise Damaged("optim.safetensors holds no 'rng.cpu' state")
    for index, have in names.items():
        lacking = sorted(set(_ADAMW_STATE) - have)
        if lacking:
            raise Damaged(f"optim.safetensors parameter {index} lacks {lacking}")


def _check_moment(key: str, name: str, value: torch.Tensor, spec: CheckpointSpec, i: int) -> None:
    where = f"optim.safetensors {key}"
    if not value.is_floating_point():
        raise Damaged(f"{where} is {value.dtype}, not a floating-point tensor")
    if name == "step":
        if value.numel() != 1 or not bool(torch.isfinite(value).all()) or float(value) < 0:
            raise Damaged(f"{where} is not one finite, non-negative count")
        return
    if spec.params is not None:
        shape, dtype = spec.params[i]
        if tuple(value.shape) != shape or value.dtype != dtype:
            raise Damaged(
                f"{where} is {tuple(value.shape)} {value.dtype}, its parameter {shape} {dtype}"
            )
    if not bool(torch.isfinite(value).all()):
        raise Damaged(f"{where} holds non-finite values (NaN or inf)")
    if name != "exp_avg" and bool((value < 0).any()):
        raise Damaged(f"{where} holds negative values (a second moment)")


def _check_rng(key: str, value: torch.Tensor) -> None:
    if key == "rng.cpu":
        want = torch.get_rng_state()
    elif key == "rng.cuda":
        want = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    else:
        raise Damaged(f"optim.safetensors holds an unexpected tensor {key!r}")
    if value.dtype != torch.uint8 or value.ndim != 1:
        raise Damaged(f"optim.safetensors {key} is not a uint8 vector")
    if want is not None and value.shape != want.shape:
        have, need = value.numel(), want.numel()
        raise Damaged(f"optim.safetensors {key} has {have} bytes, this torch {need}")


def check_rng_file(file: Path) -> None:
    """A DCP checkpoint's per-rank RNG file (``rng/rank_<r>.safetensors``)."""
    with _Tensors(file) as f:
        for key in f.keys():
            _check_rng(key, _get(f, key, file.name))


def compare_shapes(saved: dict[str, tuple[int, ...]], spec: CheckpointSpec) -> None:
    """Raise :class:`Mismatch` when the saved names or shapes are not the model's."""
    shapes = {k: shape for k, (shape, _) in spec.tensors.items()}
    missing = sorted(set(shapes) - set(saved))
    unexpected = sorted(set(saved) - set(shapes))
    resized = [
        f"{k} {saved[k]} vs {shapes[k]}" for k in sorted(set(saved) & set(shapes))
        if saved[k] != shapes[k]
    ]  # fmt: skip
    parts = []
    if missing:
        parts.append(f"missing {missing[:3]}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:3]}")
    if resized:
        parts.append(f"shapes differ: {resized[:3]} (checkpoint vs model)")
    if parts:
        raise Mismatch(", ".join(parts))


def _expect(value: Any, kind: str, where: str) -> None:
    ok = {
        "int": lambda v: _is_int(v) and v >= 0,
        "number": lambda v: _finite_number(v) and v >= 0,
        "list": lambda v: isinstance(v, list),
        "dict": lambda v: isinstance(v, dict),
        "str": lambda v: isinstance(v, str),
    }[kind](value)
    if not ok:
        what = {"int": "a non-negative integer", "number": "a finite non-negative number"}
        raise Damaged(f"{where} is {value!r:.40}, not {what.get(kind, 'a ' + kind)}")


def _is_int(value: Any) -> bool:
    return type(value) is int


def _finite_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)
