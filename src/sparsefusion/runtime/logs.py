"""The run's log file: the package's log goes to ``<run_dir>/train.log``."""

from __future__ import annotations

import logging
from pathlib import Path


def log_to_run_folder(run_dir: Path) -> None:
    """Send the package's log to ``<run_dir>/train.log`` (and only this run's file)."""
    path = str((run_dir / "train.log").resolve())
    root = logging.getLogger("sparsefusion")
    for h in list(root.handlers):
        if getattr(h, "_sparsefusion_run_log", False) and h.baseFilename != path:
            root.removeHandler(h)  # an earlier run in this process
            h.close()
    if any(getattr(h, "baseFilename", None) == path for h in root.handlers):
        return
    handler = logging.FileHandler(path)
    handler._sparsefusion_run_log = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
