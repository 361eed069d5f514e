"""Requested file paths -> files, never outside the folder they are asked under.

Every file the server reads on a client's behalf goes through :func:`safe_file`: the path is
joined to the run folder, symlinks and ``..`` are resolved, and the result must still lie inside
the (resolved) run folder and have a suffix the viewer shows.
"""

from __future__ import annotations

from pathlib import Path

SERVED_SUFFIXES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".wav": "audio/wav",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".json": "application/json",
    ".jsonl": "text/plain; charset=utf-8",
    ".yaml": "text/plain; charset=utf-8",
}


class UnsafePath(ValueError):
    """A requested path that leaves its folder, does not exist or is not a servable file."""


def inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (resolved) lies inside ``root`` (resolved)."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def safe_file(root: Path, relative: str) -> Path:
    """The file ``root/relative`` if it is a servable file inside ``root``.

    Args:
        root: the folder the request may read from (a run folder).
        relative: the client's path, relative to ``root``.

    Returns:
        The resolved file path.

    Raises:
        UnsafePath: the path is absolute, leaves ``root`` (``..``, a symlink), does not exist,
            is not a regular file, or has a suffix outside :data:`SERVED_SUFFIXES`.
    """
    if not relative or relative.startswith(("/", "\\")) or "\x00" in relative:
        raise UnsafePath(f"path {relative!r} must be relative to the run folder")
    root = Path(root).resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise UnsafePath(f"path {relative!r} leaves the run folder")
    if not target.is_file():
        raise UnsafePath(f"no file {relative!r} in the run folder")
    if target.suffix.lower() not in SERVED_SUFFIXES:
        raise UnsafePath(f"files of type {target.suffix!r} are not served")
    return target


def media_type(path: Path) -> str:
    """The Content-Type of a servable file."""
    return SERVED_SUFFIXES[Path(path).suffix.lower()]
