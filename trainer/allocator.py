"""Keep freed memory in the process: training, and the analyzer's passes, reallocate the same
activation buffers every batch (``train`` and ``compute_reaction`` call this).

With glibc's defaults, a buffer above the (adaptive) mmap threshold is mapped fresh on every
allocation and unmapped on free, and a heap whose free top grows beyond the trim threshold is
handed back to the kernel; a training step of a thesis model on 50x200 images allocates and
frees tens of such buffers, so every batch page-faults its activations in again: a fifth to a
quarter of an epoch's CPU time was system time (docs/BENCHMARKS.md, "The trainer against a
plain loop"). Raising both thresholds lets freed buffers be reused as they are. Results are
unchanged (only where memory comes from changes); the process keeps its peak memory instead
of returning it between batches.
"""

from __future__ import annotations

import ctypes
import platform

MMAP_THRESHOLD = 256 << 20  # allocations below this come from the heap, which is reused
TRIM_THRESHOLD = 1 << 30  # free heap top kept before any is handed back to the kernel
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_kept = False  # whether keep_freed_memory has taken effect in this process


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this whole process (a no-op elsewhere, and
    there is no undoing it); return whether glibc took both settings."""
    global _kept
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library symbols, or a libc without mallopt
        return False
    _kept = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _kept


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has taken effect in this process: blocks below
    ``MMAP_THRESHOLD`` are then reused from the heap, not mapped afresh."""
    return _kept
