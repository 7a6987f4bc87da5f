"""Opt-in: keep freed CPU memory in the process, so that a CPU training step does not page its tensors in afresh.

glibc's malloc serves every request above its mmap threshold (at most 32 MiB) with a fresh `mmap` and returns it to
the kernel on `free`. A KD step over a large vocabulary allocates (rows × V) float32 tensors of hundreds of MiB
several times per step; each comes back from the kernel as untouched pages, and touching them costs one page fault
per 4 KiB plus the kernel zeroing the page. On `configs/tiny-cpu.yaml` (batch 4, the teacher's 151,646-token
vocabulary, one thread) a dskd forward + backward made 0.6-1.1 million page faults and spent about as long in the
kernel as in user code. PyTorch's CUDA caching allocator avoids this for GPU memory; on CPU, Intel's guides recommend
preloading jemalloc or tcmalloc for the same reason. `keep_freed_cpu_memory` gets the effect from glibc itself, with
`mallopt(3)`: every allocation from the heap (`M_MMAP_MAX = 0`) and the heap never trimmed (`M_TRIM_THRESHOLD = -1`),
so freed blocks are reused by the next steps.

The price is resident memory: the heap fragments (a freed block loses a few bytes to a small allocation and no longer
fits the next large one) and grows for the first steps before its blocks are reused, then stays at that high-water
mark. Measured with `benchmarks/cpu_malloc.py` on that recipe (`benchmarks/results/cpu_malloc_tiny.json`): step time
0.58x (dskd) and 0.61x (dwakd), peak resident memory 1.27x for both (1.26x-1.43x in other runs). Hence opt-in:
`DWAKD_CPU_MALLOC=keep` makes `dwakd.run.build_training` apply it to a run on CPU; the default, `system`, leaves
malloc as it is. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

CPU_MALLOC_ENV = "DWAKD_CPU_MALLOC"  # "system" (default) or "keep" (CPU runs keep freed memory)
_M_TRIM_THRESHOLD = -1  # glibc <malloc.h> parameter numbers
_M_MMAP_MAX = -4
_applied = False


def cpu_malloc_policy() -> str:
    """"system" or "keep", from `DWAKD_CPU_MALLOC` (default system); anything else is an error naming the variable."""
    value = os.environ.get(CPU_MALLOC_ENV, "system").strip().lower() or "system"
    if value not in ("keep", "system"):
        raise ValueError(f"{CPU_MALLOC_ENV}={os.environ[CPU_MALLOC_ENV]!r}: use 'keep' or 'system'")
    return value


def keep_freed_cpu_memory() -> bool:
    """With `DWAKD_CPU_MALLOC=keep`, make glibc's malloc keep freed memory for reuse (see the module docstring);
    True when it now does. Idempotent. False unless asked, and without glibc (macOS, musl, Windows)."""
    global _applied
    if _applied:
        return True
    if cpu_malloc_policy() == "system" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1)):
        logger.debug("mallopt refused the settings; CPU malloc left as it is")
        return False
    _applied = True
    logger.info("CPU memory: freed blocks stay in the process for reuse (%s=keep)", CPU_MALLOC_ENV)
    return True


__all__ = ["CPU_MALLOC_ENV", "cpu_malloc_policy", "keep_freed_cpu_memory"]
