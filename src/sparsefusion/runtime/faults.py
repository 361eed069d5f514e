"""Fault injection for tests (a testing aid; never set it in real runs).

The environment variable ``SPARSEFUSION_FAULTS`` holds comma-separated ``name=step`` entries:

- ``nan_at_step=N``: the loss of step N is multiplied by NaN before backward (NaN gradients).
- ``pause_at_step=N``: after step N is logged and before it is saved, write
  ``<run_dir>/fault_pause_at_step`` and sleep (a test then kills the process with SIGKILL).
- ``pause_in_save=N``: inside the checkpoint save of step N, after the weights are written to the
  temporary folder and before it is renamed, write ``<run_dir>/fault_pause_in_save`` and sleep.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "SPARSEFUSION_FAULTS"


def fault_step(name: str) -> int:
    """The step at which fault ``name`` fires (0 when it is not set)."""
    for item in os.environ.get(ENV, "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == name and value.strip():
            return int(value)
    return 0


def nan_at(step: int) -> bool:
    """True when the loss of ``step`` must be poisoned with NaN."""
    return fault_step("nan_at_step") == step


def maybe_pause(name: str, step: int, marker_dir: Path) -> None:
    """Sleep (until killed) when fault ``name`` is set for ``step``; leaves a marker file first."""
    if fault_step(name) != step:
        return
    (Path(marker_dir) / f"fault_{name}").write_text(str(step))
    while True:
        time.sleep(1.0)
