"""Host allocator tuning for CPU training: keep freed memory for reuse instead of returning it.

A training step on CPU allocates and frees the same large activations (logits, attention and
FFN buffers of several MB) every step. With glibc's defaults every block above the dynamic
mmap threshold (at most 32 MB) is a fresh ``mmap`` and freed memory at the heap top is trimmed,
so each step pays page faults for memory it just released: on the demo step a third of the
process's time was system time (``docs/benchmarks.md``). Raising the mmap and trim thresholds
(the knobs PyTorch's CPU tuning guide reaches with jemalloc or tcmalloc) lets the heap serve
those blocks again; the process keeps its peak heap, which on the demo is about 8% more
resident memory.

Only glibc on Linux has these knobs; elsewhere (macOS, musl) the call does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_KEEP_BELOW = 1 << 30  # blocks up to 1 GiB come from the heap and stay there once freed
_TOP_PAD = 64 << 20  # grow the heap 64 MiB at a time


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Make glibc reuse freed blocks up to 1 GiB instead of unmapping or trimming them.

    Process-wide and idempotent. Returns True when the settings were applied (glibc), False
    where there is nothing to tune.
    """
    libc = _glibc()
    if libc is None:
        return False
    ok = all(
        libc.mallopt(param, ctypes.c_int(value)) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, _KEEP_BELOW),
            (_M_TRIM_THRESHOLD, _KEEP_BELOW),
            (_M_TOP_PAD, _TOP_PAD),
        )
    )
    if not ok:
        log.warning("glibc refused the allocator settings (mallopt); keeping its defaults")
    return ok


def apply_host_malloc(mode: str) -> bool:
    """Apply ``train.host_malloc``: ``reuse`` tunes glibc (see module doc), ``system`` leaves it."""
    if mode == "system":
        return False
    if mode != "reuse":
        raise ValueError(f"train.host_malloc must be 'reuse' or 'system', got {mode!r}")
    return keep_freed_memory()
