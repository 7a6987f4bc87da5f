"""One process-wide thread pool for the numba kernels that release the GIL (Soft-DTW, row statistics).

Plain Python threads running nogil kernels give true parallelism without a second OpenMP pool competing with
torch's; one shared pool keeps the thread count at one per CPU however many ops use it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_POOL: ThreadPoolExecutor | None = None
_LOCK = threading.Lock()


def worker_pool() -> ThreadPoolExecutor:
    """The pool (created on first use, one thread per CPU)."""
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="dwakd-ops")
        return _POOL
