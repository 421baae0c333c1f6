"""The process's memory allocator during a pass: freed memory kept for the next batch.

glibc's malloc gives memory back to the system when a large block is freed (blocks above its
mmap threshold are unmapped; free space above its trim threshold at the top of the heap is
released), and the next batch's tensors of the same sizes page-fault it all in again: on a CPU
about a fifth of a torch pass's CPU time was the kernel's, handling those faults
(docs/BENCHMARKS.md, "Fixed cost and the whole CLI against captum"). Fixed thresholds keep
every block of up to 32 MiB (glibc's largest allowed threshold, and the torch backend's
activation budget) in the heap and never trim it, so the pass's memory is faulted in once.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed blocks of up to 32 MiB for reuse (process-wide).

    Returns True when it applied: Linux with glibc; elsewhere nothing changes. The resident
    memory then stays at the pass's peak instead of dropping between batches.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library symbols, or a libc without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and \
        mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
