"""Fixed allocator thresholds for the long-running processes: the agent, its Forward intake
process and the fake API.

glibc's malloc serves a block of 128 KiB or more with an mmap of its own, and after each such
block is freed it raises that threshold to the block's size (up to 32 MiB), with the heap's
trim threshold at twice it: free memory at the top of the heap past that goes back to the
kernel. These processes allocate blocks of that size all the time (a 1000-item batch body of
~150 KB and the request it goes out in, a Forward read, a message of the intake process), and
whether each lands in memory the process already has or in fresh pages the kernel must fault
in, page by page, then depends on the order of the allocations around it. A change elsewhere
in the delivery code took one POST of a batch from 2 page faults to 62, and its system CPU
from ~0.1 ms to 0.3-0.7 ms, next to ~1 ms of user CPU (`bench/bench_upload.py`).

Fixed thresholds take that out of chance: a block under `MMAP_THRESHOLD` comes from the heap,
and up to `TRIM_THRESHOLD` of free heap is kept for the next ones instead of being handed back
and faulted in again. The price is at most `TRIM_THRESHOLD` of resident memory kept after a
burst. An operator's own `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` (glibc's
environment tunables) win: that threshold is left as they set it. Without glibc (musl has no
`mallopt`) nothing changes.
"""

from __future__ import annotations

import ctypes
import os

#: blocks under this come from the heap (glibc's own default starts at 128 KiB)
MMAP_THRESHOLD = 4 * 1024 * 1024
#: free heap kept at its top before any is given back to the kernel
TRIM_THRESHOLD = 8 * 1024 * 1024

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune() -> dict[str, int]:
    """Set the thresholds this process's malloc uses (once, at its start); returns those set
    (empty where there is no glibc, or the environment set them)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done: dict[str, int] = {}
    for name, param, value in (
        ("mmap_threshold", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("trim_threshold", _M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ):
        if f"MALLOC_{name.upper()}_" in os.environ:
            continue
        if mallopt(param, value) == 1:
            done[name] = value
    return done
