"""The C allocator's thresholds for processes that move model-sized buffers.

Every update and model version passes through buffers of 0.5 to tens of MB (chunk frames,
reassembled messages, paho's packets). glibc serves an allocation above its mmap threshold
(128 KiB at first) with a fresh memory map, and gives the top of the heap back to the kernel
once more than its trim threshold is free there: either way the next buffer of that size costs
a page fault per 4 KiB page, the kernel zeroing each. Measured on the aggregator's ingest of
1M-parameter updates (bench/aggregate): 50,000 to 200,000 minor faults a second in each process
and a third of the throughput. glibc raises its mmap threshold by itself only up to the sizes it
has seen freed, and gives up adjusting once a threshold is set, so both are set here (mallopt(3)):

* mmap threshold 32 MiB (glibc's own upper bound for the dynamic threshold): frames, updates
  and models up to that size come from the heap and reuse pages already mapped;
* trim threshold an eighth of the machine's memory, between 32 and 256 MiB: up to that much
  freed heap is kept for the next buffer instead of being returned and faulted in again (on a
  1 GB Raspberry Pi: 128 MiB, held only after buffers that large were in use).

A no-op where the C library is not glibc (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import psutil
import structlog

log = structlog.get_logger("ember.memory")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""mallopt(3) parameter numbers (glibc's malloc.h)."""
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_BOUNDS = (32 * 1024 * 1024, 256 * 1024 * 1024)


def trim_threshold(total_memory: int) -> int:
    """The freed heap kept for reuse: an eighth of ``total_memory``, within :data:`TRIM_BOUNDS`."""
    low, high = TRIM_BOUNDS
    return max(low, min(high, total_memory // 8))


def tune_allocator(total_memory: int | None = None) -> bool:
    """Set glibc's mmap and trim thresholds for model-sized buffers (see the module docstring);
    False where they cannot be set. Call once, early, in a process that sends or receives
    updates."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    trim = trim_threshold(total_memory or psutil.virtual_memory().total)
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, trim))
    log.debug("allocator_tuned", mmap_threshold=MMAP_THRESHOLD, trim_threshold=trim, done=done)
    return done
