"""Read the tensors of a Hugging Face folder one at a time (single file or sharded).

``model.safetensors`` or ``model.safetensors.index.json`` + its shards, read with
``safetensors.safe_open``. Each read opens the file, copies one tensor out and closes it again:
a memory map kept open would keep every page read so far resident, so an import would end with
the whole checkpoint in the process's memory beside the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sparsefusion.interop.hf_config import HFImportError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFWeights:
    """Tensor name -> file map of a folder; reads one tensor at a time.

    Names are the checkpoint's own, e.g. ``model.layers.0.self_attn.q_proj.weight``. Usable as a
    context manager (no file stays open between reads).

    Args:
        folder: the Hugging Face model folder.

    Raises:
        HFImportError: no weights, unreadable index, or a shard the index names is missing.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._file_of = _index(self.folder)
        self.read: set[str] = set()

    def __enter__(self) -> HFWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def names(self) -> list[str]:
        """Every tensor name of the checkpoint."""
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read one tensor (checked against ``shape`` when given).

        Raises:
            HFImportError: the tensor is missing or has another shape (names file and key).
        """
        file = self._file_of.get(name)
        if file is None:
            raise HFImportError(f"{self.folder}: no tensor '{name}' in the checkpoint")
        path = self.folder / file
        with _open(path) as handle:
            if shape is not None:
                have = tuple(handle.get_slice(name).get_shape())
                if have != tuple(shape):
                    raise HFImportError(
                        f"{path}: tensor '{name}' has shape {list(have)}, expected "
                        f"{list(shape)} from config.json"
                    )
            tensor = handle.get_tensor(name)
        self.read.add(name)
        return tensor

    def unread(self) -> list[str]:
        """Names not read so far (after an import: tensors the model had no place for)."""
        return [n for n in self._file_of if n not in self.read]


def _open(path: Path) -> Any:
    try:
        return safe_open(str(path), "pt")
    except Exception as e:  # safetensors raises its own error types
        raise HFImportError(f"{path}: cannot open safetensors file ({e})") from e


def _index(folder: Path) -> dict[str, str]:
    """Tensor name -> file name (relative to ``folder``)."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HFImportError(f"{index}: unreadable index (needs 'weight_map'): {e}") from e
        for file in sorted(set(weight_map.values())):
            if not (folder / file).is_file():
                raise HFImportError(f"{index}: names shard {file!r}, missing from {folder}")
        return dict(weight_map)
    single = folder / SINGLE
    if single.is_file():
        with _open(single) as f:
            return dict.fromkeys(f.keys(), SINGLE)
    raise HFImportError(
        f"{folder}: no weights: neither {SINGLE} nor {INDEX} (only safetensors are read)"
    )
