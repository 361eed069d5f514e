"""Read the tensors of a Hugging Face folder one at a time (single file or sharded).

``model.safetensors`` or ``model.safetensors.index.json`` + its shards. Files are opened with
``safetensors.safe_open`` (memory-mapped); :meth:`HFWeights.get` reads one tensor, so importing
never holds a second full copy of the weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sparsefusion.interop.hf_config import HFImportError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFWeights:
    """Tensor name -> file map of a folder, with lazily opened safetensors handles.

    Use as a context manager (closes the files). Names are the checkpoint's own, e.g.
    ``model.layers.0.self_attn.q_proj.weight``.

    Args:
        folder: the Hugging Face model folder.

    Raises:
        HFImportError: no weights, unreadable index, or a shard the index names is missing.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._file_of = _index(self.folder)
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self.read: set[str] = set()

    def __enter__(self) -> HFWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._handles.clear()

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
        handle = self._handle(file)
        if shape is not None:
            have = tuple(handle.get_slice(name).get_shape())
            if have != tuple(shape):
                raise HFImportError(
                    f"{self.folder / file}: tensor '{name}' has shape {list(have)}, expected "
                    f"{list(shape)} from config.json"
                )
        self.read.add(name)
        return handle.get_tensor(name)

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            path = self.folder / file
            try:
                self._handles[file] = self._stack.enter_context(safe_open(str(path), "pt"))
            except (OSError, Exception) as e:  # safetensors raises its own error types
                raise HFImportError(f"{path}: cannot open safetensors file ({e})") from e
        return self._handles[file]

    def unread(self) -> Iterator[str]:
        """Names not read so far (after an import: tensors the model had no place for)."""
        return (n for n in self._file_of if n not in self.read)


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
        with safe_open(str(single), "pt") as f:
            return {name: SINGLE for name in f.keys()}  # noqa: SIM118 (a handle, not a dict)
    raise HFImportError(
        f"{folder}: no weights: neither {SINGLE} nor {INDEX} (only safetensors are read)"
    )
