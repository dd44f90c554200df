"""Process-wide settings of the host (CPU) side that the ``mm`` commands apply at start-up.

Why the allocator: glibc's malloc serves blocks above its mmap threshold (128 KiB to start, raised
dynamically up to 32 MiB) with fresh ``mmap`` pages and returns them to the kernel on free, and trims the
heap top once more than twice that threshold is free. CPU inference allocates and frees the same
multi-MiB activations every layer of every batch, so each batch takes tens of thousands of minor page faults,
each a kernel entry that zero-fills a 4 KiB page before the kernel writes it again (ViT-B-32, batch 32, fp32:
44k-104k faults per forward; the count drifts with the dynamic threshold, which also makes timings noisy).
Keeping freed blocks in the heap (no trim, threshold at glibc's 32 MiB maximum, 64 MiB of top padding per heap
extension) makes later batches reuse warm pages: 0 faults and 5-8% less time per ViT-B-32 forward
(docs/benchmarks.md). The cost: the process keeps its peak heap instead of returning it to the system between
batches. The same effect is what Intel's PyTorch CPU guide gets from preloading jemalloc or tcmalloc; glibc's
own ``mallopt`` needs no extra library.

This is done by the ``mm`` command and ``train.py``, not on ``import mm``: a library does not change the
allocator of a process it is imported into. Python users opt in with :func:`tune_malloc`.
"""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit); bigger blocks still use mmap
TOP_PAD = 64 << 20
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest means "never trim"
ENV = "MM_TUNE_MALLOC"  # set to 0 to keep the allocator's defaults

_tuned = False


def tune_malloc() -> bool:
    """Keep freed heap memory for reuse (see the module docstring). Returns True when applied (or already),
    False where it does not apply: not glibc (macOS, Windows, musl), or ``MM_TUNE_MALLOC=0``."""
    global _tuned
    if _tuned:
        return True
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own libc
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # each call returns 1 on success; glibc applies each setting independently
    ok = [mallopt(p, v) for p, v in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                     (_M_TOP_PAD, TOP_PAD))]
    _tuned = all(r == 1 for r in ok)
    return _tuned


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask: a container's or ``taskset``'s limit, not the
    machine's count), as PyTorch's DataLoader counts them for its too-many-workers warning."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers(cap: int = 4) -> int:
    """Image-loading worker processes for a command that did not say: one per available core but one (the
    command's own process runs the model on it), at least 1, at most ``cap``. On 2 cores that is 1 worker (more
    would only take turns with the model on the same cores; PyTorch warns past the core count)."""
    return max(1, min(cap, available_cpus() - 1))
