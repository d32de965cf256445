"""This process's memory: its peak, and glibc's heap kept from growing block after block.

A block-by-block sketch frees a block's worth of memory after every block; these calls make the
system see it (``malloc_trim``), keep the next block's temporaries out of the heap (``mallopt``), and
report the peak the report records. All no-ops where the C library is not glibc.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.cache
def _glibc() -> Any | None:
    """The C library when it is glibc (it has ``malloc_trim``), else None. Looked up once: ``find_library``
    runs ``ldconfig -p`` in a child process, which a process holding a model's memory should not fork per block."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018  (only glibc has it)
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_memory() -> None:
    """Give the memory a finished block freed back to the system (glibc's ``malloc_trim``), so the next
    block does not grow on top of a fragmented heap: glibc raises its mmap threshold after a large free,
    so later block-sized allocations land in the heap, where freed holes stay resident. No-op elsewhere."""
    import ctypes
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
SKETCH_MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold(threshold: int = SKETCH_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (``mallopt``), unless the
    user set one (``MALLOC_MMAP_THRESHOLD_``). Returns whether it was set.

    glibc's threshold is dynamic: each freed mmapped chunk raises it to that chunk's size (up to 32 MiB),
    so after the first few blocks a sketch's medium temporaries (row chunks, k-means passes, per-layer
    activations) are carved from the heap, where the holes they leave stay resident and the peak
    creeps up block after block. Fixed, every allocation of at least ``threshold`` is its own mapping,
    returned to the system when freed. Process-wide, so only processes that do nothing but sketch call
    it (``spallm sketch``, the ``bench scale`` children), not the library."""
    import ctypes
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def peak_memory() -> dict[str, int]:
    """Peak resident memory of this process so far (and peak CUDA memory when a GPU is in use), in bytes."""
    import resource

    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    return peak
