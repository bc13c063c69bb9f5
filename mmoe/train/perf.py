"""Process-level performance settings for CPU runs.

`tune_cpu_allocator` keeps large allocations on glibc's heap (no ``mmap``/``munmap`` per tensor) and
never trims it. Without it every backward pass of a layer with many experts maps fresh pages for its
expert weight gradients (256 MiB per matrix at E=128, d=512, h=1024 in fp32) and the kernel zero-fills
them on first touch: measured here, the weight-gradient GEMMs of that layer take 163 ms with a fresh
mapping and 64 ms with the heap reused. It is the CPU counterpart of PyTorch's CUDA caching allocator
(and what jemalloc/tcmalloc give CPU training); the price is that freed memory stays with the process.
`mmoe bench` and `mmoe train` call it on CPU unless ``MMOE_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_done = False


def tune_cpu_allocator() -> bool:
    """Serve large allocations from the (never trimmed) heap; True when applied (glibc only)."""
    global _done
    if _done:
        return True
    if os.environ.get("MMOE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
