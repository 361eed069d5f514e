"""Optional data packages: a clear error naming what to install when one is absent."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from types import ModuleType


class SourceUnavailable(ValueError):
    """A data source's optional package is not installed."""


def need_module(module: str, source: str, install: str) -> ModuleType:
    """Import ``module`` or raise :class:`SourceUnavailable` telling how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SourceUnavailable(
            f"data source {source!r} needs the Python package {module!r}: {install}"
        ) from e


def need_path(path: str, source: str, install: str) -> Path:
    """Return ``path`` if it exists, else raise :class:`SourceUnavailable`."""
    p = Path(path)
    if not p.exists():
        raise SourceUnavailable(f"data source {source!r} needs {path}: {install}")
    return p


def need_program(program: str, source: str, install: str) -> str:
    """Return the full path of ``program`` on PATH, else raise :class:`SourceUnavailable`."""
    found = shutil.which(program)
    if found is None:
        raise SourceUnavailable(f"data source {source!r} needs the program {program!r}: {install}")
    return found
