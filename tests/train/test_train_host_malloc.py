"""train.host_malloc: glibc keeps freed blocks for reuse (fewer page faults), or is left alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sparsefusion.train.config import LoopConfig
from sparsefusion.train.host_malloc import _glibc, apply_host_malloc

needs_glibc = pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt is not available")

# A training step's pattern: allocate, touch and free the same 64 MB block again and again.
_FAULTS = """
import resource, sys, torch
from sparsefusion.train.host_malloc import apply_host_malloc
apply_host_malloc(sys.argv[1])
def block():
    torch.empty(16 * 2**20).fill_(1.0)
block()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _minor_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_reuse_serves_a_freed_block_again_without_page_faults():
    system, reuse = _minor_faults("system"), _minor_faults("reuse")
    # system: every 64 MB block is a fresh mmap (thousands of faults each); reuse: the heap
    # hands the same pages back.
    assert system > 2000, system
    assert reuse < system / 5, (reuse, system)


def test_system_changes_nothing_and_bad_values_are_refused():
    assert apply_host_malloc("system") is False
    with pytest.raises(ValueError, match="host_malloc"):
        apply_host_malloc("jemalloc")
    with pytest.raises(ValueError, match="train.host_malloc"):
        LoopConfig(host_malloc="fast")
