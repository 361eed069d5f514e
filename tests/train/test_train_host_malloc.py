"""train.host_malloc: glibc keeps freed blocks in the heap for reuse, or is left alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sparsefusion.runs.config import LoopConfig
from sparsefusion.runtime.host_malloc import _glibc, apply_host_malloc

needs_mallinfo2 = pytest.mark.skipif(
    _glibc() is None or not hasattr(_glibc(), "mallinfo2"), reason="needs glibc >= 2.33"
)

# A training step's pattern: a 64 MB activation is allocated, touched and freed. Where did glibc
# put it (mmapped bytes while it lives) and what does the heap keep once it is freed?
_HEAP = """
import ctypes, sys, torch
from sparsefusion.runtime.host_malloc import apply_host_malloc
names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
         "fordblks", "keepcost")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in names]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
apply_host_malloc(sys.argv[1])
x = torch.empty(16 * 2**20).fill_(1.0)
mapped = libc.mallinfo2().hblkhd
del x
print(mapped, libc.mallinfo2().fordblks)
"""


def _heap(mode: str) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", _HEAP, mode], capture_output=True, text=True, check=True
    )
    mapped, kept = out.stdout.strip().splitlines()[-1].split()
    return int(mapped), int(kept)


@needs_mallinfo2
def test_reuse_keeps_a_freed_activation_in_the_heap_instead_of_unmapping_it():
    block = 64 * 2**20
    mapped, kept = _heap("system")
    assert mapped >= block and kept < block  # its own mmap, returned to the kernel when freed
    mapped, kept = _heap("reuse")
    assert mapped < block and kept >= block  # from the heap, and there for the next step


def test_system_changes_nothing_and_bad_values_are_refused():
    assert apply_host_malloc("system") is False
    with pytest.raises(ValueError, match="host_malloc"):
        apply_host_malloc("jemalloc")
    with pytest.raises(ValueError, match="train.host_malloc"):
        LoopConfig(host_malloc="fast")
