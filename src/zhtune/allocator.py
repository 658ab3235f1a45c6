"""Keep freed CPU memory in the process: no page faults for tensors allocated again.

PyTorch's CPU tensors come from glibc ``malloc``. A large block (above the mmap threshold, which
glibc raises by itself to the largest block freed so far, 32 MiB at most) is mapped fresh from
the kernel on every allocation and unmapped when freed, and memory freed at the top of the heap
is handed back once it exceeds the trim threshold. A training step allocates and frees the same
activations every step, so each step touches freshly mapped pages, and the kernel zeroes every
4 KiB page on its first touch. On the 4M-parameter benchmark model (LoRA, packed, bf16) that
was 16k page faults a step; without them the step is 3-11% faster (mean 8% over five interleaved
runs), for 2-5% more peak RSS.

:func:`keep_freed_memory` raises both thresholds, so blocks up to 128 MiB come from the heap and
stay there once freed, for the next step to reuse: the cure jemalloc or tcmalloc bring (Intel's
advice for PyTorch on CPUs), without preloading a library. The resident size does not shrink
between steps. Meant for the allocate-free-repeat pattern of training and generation on a CPU
(``zhtune train`` and everything that loads a run for inference call it; batched generation
gets about 5% faster); glibc only (elsewhere it does nothing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap (larger ones are still mapped on their own). 128 MiB
#: (64 before) covers a small model's fp32 output-layer gradient, SmolLM2's (49152, 576) of 113
#: MB, which full fine-tuning allocates twice a step: mapped fresh, 55-83k page faults a step;
#: from the heap ~1-4k, the step 2.6% faster (bench/ab_steps.py, 3 pairs), peak RSS +0.02 GiB
#: there and ~0.1 GiB in bench/train_real.py's full fine-tuning run (3.30-3.36 -> 3.44 GiB).
MMAP_THRESHOLD = 128 << 20
#: Free memory at the top of the heap handed back to the kernel only above this.
TRIM_THRESHOLD = (1 << 31) - 1

_done = False


def _libc() -> Any:
    """glibc, or None (not Linux, or a C library without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed blocks (up to 128 MiB) for reuse instead of returning them to the
    kernel. Process-wide and idempotent; returns whether it took effect (False off glibc)."""
    global _done
    if _done:
        return True
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not glibc (musl and others have no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _done


def hand_back_memory() -> bool:
    """Return the free memory at the top of the heap and in free pages to the kernel
    (``malloc_trim(0)``). :func:`keep_freed_memory` keeps up to 2 GiB of freed memory for reuse;
    after one large request (a server's long prompt) that would stay resident for good, so the
    server calls this once such a request is done. Returns whether glibc released anything
    (False off glibc)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
