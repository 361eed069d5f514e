"""Progress reporting: a tqdm bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
from typing import Any

from tqdm import tqdm

log = logging.getLogger("sparsefusion")


class Progress:
    """Shows training progress; ``bar=False`` logs one line per logged step instead."""

    def __init__(self, *, total: int, start: int, bar: bool) -> None:
        self._bar = (
            tqdm(total=total, initial=start, unit="step", dynamic_ncols=True) if bar else None
        )

    def update(self, step: int, row: dict[str, Any]) -> None:
        summary = _summary(row)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(summary, refresh=True)
        else:
            log.info("step %d %s", step, summary)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            log.info(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _summary(row: dict[str, Any]) -> str:
    parts = [f"loss={row['loss']:.3f}"]
    parts += [f"{k[5:]}={v:.3f}" for k, v in row.items() if k.startswith("loss/")]
    parts.append(f"lr={row['lr']:.2e}")
    parts.append(f"tok/s={row['tokens_per_s']:.0f}")
    return " ".join(parts)


def use_bar(progress: str) -> bool:
    """``run.progress``: ``bar``, ``log``, or ``auto`` (a bar when stderr is a terminal)."""
    import sys

    if progress == "bar":
        return True
    if progress == "log":
        return False
    return sys.stderr.isatty()


def format_row(row: dict[str, Any]) -> str:
    """A validation row as one line of ``key=value`` losses."""
    keys = [k for k in row if k.startswith("loss")]
    body = " ".join(f"{k}={row[k]:.4f}" for k in keys)
    return f"step {row['step']} {row.get('split', 'train')}: {body}"
