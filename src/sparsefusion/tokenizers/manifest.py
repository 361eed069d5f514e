"""The manifest a saved tokenizer directory carries: its files' SHA-256 hashes, checked on load.

Both tokenizers (the Chameleon one in ``multimodal.py``, the Transfusion one in
``transfusion.py``) write ``manifest.json`` with :func:`write_manifest` and read it back with
:func:`read_manifest` then :func:`verify_files`; each checks its own kind and file set in between.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(d: Path, files: Iterable[str], **fields: Any) -> None:
    """Write ``d/manifest.json``: ``fields`` plus ``files``, each file's hash (written last, so a
    directory with a manifest has every file it lists)."""
    manifest = {**fields, "files": {f: sha256_file(d / f) for f in files}}
    (d / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")


def read_manifest(d: Path, error: type[Exception]) -> dict[str, Any]:
    """The parsed manifest of ``d``; ``error`` when it is missing, unreadable or has no
    ``files``/``format_version``."""
    try:
        manifest = json.loads((d / MANIFEST).read_text("utf-8"))
        if not isinstance(manifest, dict):
            raise TypeError(f"a JSON {type(manifest).__name__}, not an object")
        missing = [k for k in ("files", "format_version") if k not in manifest]
        if missing:
            raise KeyError(", ".join(missing))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise error(f"{d}: missing or unreadable {MANIFEST} ({e})") from e
    return manifest


def verify_files(d: Path, files: dict[str, str], error: type[Exception]) -> None:
    """``error`` unless every listed file exists in ``d`` and matches its hash."""
    for name, digest in files.items():
        if not (d / name).is_file():
            raise error(f"{d}: missing {name}")
        if sha256_file(d / name) != digest:
            raise error(f"{d}: {name} does not match its manifest hash")
