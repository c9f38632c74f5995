"""Process memory on the CPU: peak resident memory, and keeping freed memory for reuse (glibc malloc tuning).

By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it on ``free``, and trims the heap's free top. A training step allocates and
frees the same large activations every step, so each step page-faults them in again and the kernel
zeroes every page: on SmolLM2 with K=4 that is a fifth of the step time. ``retain_freed_memory``
turns both off, so freed memory stays in the heap and the next step reuses it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

M_TRIM_THRESHOLD = -1      # from glibc's <malloc.h>
M_MMAP_MAX = -4


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def retain_freed_memory() -> bool:
    """mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, -1): large blocks come from the heap and freed
    memory is never handed back to the OS, so the resident size stays at its peak.

    Process-wide and irreversible. Returns False (and changes nothing) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
