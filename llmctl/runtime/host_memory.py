"""Host memory for training loops on a CPU: keep freed memory for reuse.

glibc's malloc serves each allocation of more than 128 KiB-32 MiB (a threshold it moves
at run time) with a fresh `mmap` and gives the top of its heap back to the system once
more than a (likewise moving) trim threshold of it is free. A training step allocates
and frees the same activation and gradient tensors every time, so each step faulted its
memory in again, page by page: on 2 cores, about 40,000 page faults and 60-75 ms of
system time in a 500 ms step of benchmarks/bench_model.py's 4 x 256 models. With a fixed
mmap threshold of 1 GiB and no trimming, the steps reuse the heap their first iterations
grew: system time ~0, the step ~10 % faster. The price is resident memory: freed blocks
stay with the process until it ends, and torch's 64-byte-aligned blocks leave small
separators that glibc's per-thread cache keeps (up to 7 per size), so the heap settles
some steps in at a higher peak (measured over 240 steps: 753 vs 609 MiB dense, 807 vs
731 MiB MoE, then flat). A training process wants that trade; LLMCTL_KEEP_HOST_MEMORY=0
declines it. Allocators such as jemalloc or tcmalloc keep freed memory already;
elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # allocations above 1 GiB still get (and return) their own mapping
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never trim in practice
DISABLE_ENV = "LLMCTL_KEEP_HOST_MEMORY"  # "0": leave the allocator as it is


@functools.cache
def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process as described above; True if it was tuned
    (False off Linux/glibc, or with LLMCTL_KEEP_HOST_MEMORY=0)."""
    if os.environ.get(DISABLE_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    process = ctypes.CDLL(None)  # the C library this process already runs on, not a search
    # musl has mallopt as a no-op stub, and no gnu_get_libc_version
    if not (hasattr(process, "mallopt") and hasattr(process, "gnu_get_libc_version")):
        return False
    mallopt = process.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
