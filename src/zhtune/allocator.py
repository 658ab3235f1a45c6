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

:func:`use_huge_pages` backs malloc's memory with transparent huge pages (2 MiB instead of 4 KiB:
far fewer TLB misses over a step's gigabytes of activations and weights, and 512x fewer page
faults while the heap first grows). glibc does that only when told so as the process starts
(the ``glibc.malloc.hugetlb`` tunable, read from ``GLIBC_TUNABLES``), so the commands that train
(``zhtune train``, ``quickstart``, ``experiment``: :data:`zhtune.cli.TRAINING_COMMANDS`) started
from their own command line run themselves again, same arguments and PID, with the tunable added. On
SmolLM2's LoRA step (4 x 512 tokens, this 2-core CPU; 5 pairs of processes alternated) the
median step went 0.975-1.03 -> 0.91-0.97 s (-3 to -6%, every pair) and the first step 1.32-1.55
-> 1.16-1.25 s; full fine-tuning within the noise; peak RSS unchanged (2.26, 3.24 GiB).
``ZHTUNE_HUGE_PAGES=0`` turns it off; nothing happens where glibc is older than 2.35 or the kernel's
transparent huge pages are ``never``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
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


#: glibc's malloc tunable (glibc 2.35 and later) backing its heap and mapped blocks with
#: transparent huge pages (``madvise(MADV_HUGEPAGE)``); read only when a process starts.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
#: Where the kernel says whether transparent huge pages are used: ``always [madvise] never``.
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_version() -> tuple[int, ...]:
    """This process's glibc version, ``(2, 36)``; ``()`` off glibc."""
    try:
        name, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").split()
    except (ValueError, OSError, AttributeError):
        return ()
    return tuple(int(part) for part in version.split(".")) if name == "glibc" else ()


def thp_mode(path: Path = THP_MODE_FILE) -> str:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``); ``never``
    where it cannot be read."""
    try:
        text = path.read_text()
    except OSError:
        return "never"
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else "never"


def huge_pages_environment(
    environ: Mapping[str, str], glibc: tuple[int, ...], mode: str
) -> dict[str, str] | None:
    """``environ`` with :data:`HUGE_PAGES_TUNABLE` added to ``GLIBC_TUNABLES`` (after any tunables
    already there), or None where it does not apply: ``glibc`` older than 2.35 or none, the
    kernel's ``mode`` ``never``, the tunable already set (by the user, or by the run itself), or
    ``ZHTUNE_HUGE_PAGES=0``."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (
        environ.get("ZHTUNE_HUGE_PAGES", "1") == "0" or HUGE_PAGES_TUNABLE in tunables
        or glibc < (2, 35) or mode not in ("always", "madvise")
    ):  # fmt: skip
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{HUGE_PAGES_TUNABLE}=1"]))}


def huge_pages_here() -> dict[str, str] | None:
    """:func:`huge_pages_environment` of this process's environment, glibc and kernel: the
    environment a process started from here needs to run on huge pages, or None."""
    return huge_pages_environment(os.environ, glibc_version(), thp_mode())


def use_huge_pages() -> None:
    """Run this process again (the same interpreter and command line, the same PID: ``execve``)
    with malloc on transparent huge pages (:func:`huge_pages_here`); returns, doing nothing,
    where that does not apply. Only for a process's own entry point (the ``zhtune`` command):
    whatever it ran before is started over."""
    env = huge_pages_here()
    if env is None or not sys.orig_argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
