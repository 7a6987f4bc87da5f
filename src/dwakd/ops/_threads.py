"""How the numba kernels that release the GIL (Soft-DTW, row statistics, row KL) run on several threads.

torch's CPU ops run in an OpenMP team (libgomp in the Linux wheels). After each parallel region libgomp's idle
workers spin on their cores for a while (`GOMP_SPINCOUNT`, milliseconds by default) before they sleep, so threads of
our own started right after a torch op, which is always, find the other cores busy: on 2 cores a Soft-DTW call that
takes 2.1 ms with two threads on fresh costs took 4.3 ms after a `clone` (one thread's time), and `OMP_WAIT_POLICY`
must be set before torch loads to change that. So when torch's OpenMP runtime is libgomp, `run_threads` runs the
work in torch's own team: libgomp's `GOMP_parallel` (the entry point of every `#pragma omp parallel`) with a ctypes
callback, so the spinning workers take it at once, and no second set of threads competes with torch's. Each team
thread re-enters Python only to start a kernel, which then releases the GIL. Elsewhere (macOS, Windows, other
OpenMP runtimes) or with `DWAKD_OPS_THREADS=python`, one process-wide pool of Python threads does the work.

In a child forked from a process that has run either (the parent's team or pool threads do not exist there, and
libgomp's pool hangs its next parallel region, as torch's own ops do after such a fork) the work runs in the
calling thread, one index after another.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import platform
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

OPS_THREADS_ENV = "DWAKD_OPS_THREADS"  # "openmp" (default: torch's team where possible) or "python"
_MODES = ("openmp", "python")
_POOL: ThreadPoolExecutor | None = None
_LOCK = threading.Lock()
_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_GOMP_UNSET = object()
_gomp_parallel = _GOMP_UNSET  # libgomp's GOMP_parallel once looked up (None: not available)
_mode_override: str | None = None
_MIN_ELEMENTS_PER_THREAD = 1 << 20  # run_over_rows: fewer entries per thread cost more to hand off than they save
_forked = False  # set in a forked child: threads of the parent are gone


def _after_fork_in_child() -> None:
    global _POOL, _forked
    _POOL, _forked = None, True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def worker_pool() -> ThreadPoolExecutor:
    """The fallback pool (created on first use, one thread per CPU)."""
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="dwakd-ops")
        return _POOL


def ops_threads_mode() -> str:
    """"openmp" or "python": `ops_threads` if active, else `DWAKD_OPS_THREADS` (default openmp); anything else is an
    error that names the variable."""
    if _mode_override is not None:
        return _mode_override
    value = os.environ.get(OPS_THREADS_ENV, "openmp").strip().lower() or "openmp"
    if value not in _MODES:
        raise ValueError(f"{OPS_THREADS_ENV}={os.environ[OPS_THREADS_ENV]!r}: use one of {', '.join(_MODES)}")
    return value


@contextlib.contextmanager
def ops_threads(mode: str) -> Iterator[None]:
    """Run the kernels with `mode` ("openmp" or "python") inside the block (benchmarks compare the two in one run)."""
    global _mode_override
    if mode not in _MODES:
        raise ValueError(f"ops_threads mode must be one of {_MODES}, got {mode!r}")
    before, _mode_override = _mode_override, mode
    try:
        yield
    finally:
        _mode_override = before


def _torch_libgomp_path() -> str | None:
    """The libgomp that torch's ATen runs its parallel regions in (Linux), or None.

    The one loaded from torch's own directory (the PyPI wheels bundle it); otherwise the only libgomp mapped into
    the process (e.g. a distribution's torch linked against the system one); with several and none of torch's own,
    None: it would be a guess which team torch uses.
    """
    if platform.system() != "Linux" or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:
        return None
    paths = {p for p in paths if os.path.basename(p).startswith("libgomp") and ".so" in os.path.basename(p)}
    own = sorted(p for p in paths if p.startswith(os.path.dirname(torch.__file__) + os.sep))
    if own:
        return own[0]
    return next(iter(paths)) if len(paths) == 1 else None


def _openmp_parallel():
    """libgomp's `GOMP_parallel(fn, data, num_threads, flags)` of torch's runtime as a ctypes function, or None."""
    global _gomp_parallel
    if _gomp_parallel is _GOMP_UNSET:
        with _LOCK:
            if _gomp_parallel is _GOMP_UNSET:
                function = None
                path = _torch_libgomp_path()
                if path is not None:
                    try:
                        function = ctypes.CDLL(path).GOMP_parallel  # dlopen of a loaded library: the same handle
                        function.argtypes = (_CALLBACK, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
                        function.restype = None
                    except (OSError, AttributeError):
                        function = None
                _gomp_parallel = function
    return _gomp_parallel


def _team_parallel():
    """`_openmp_parallel()` when the mode is openmp, else None (the Python pool)."""
    return _openmp_parallel() if ops_threads_mode() == "openmp" else None


def uses_openmp_team() -> bool:
    """Whether `run_threads` runs work in torch's OpenMP team (else in the Python thread pool)."""
    return _team_parallel() is not None


def run_threads(work: Callable[[int], None], count: int) -> None:
    """Call `work(i)` for every i in range(count), up to `count` at a time (the calling thread takes part), and
    return when all are done; the first exception raised by any is re-raised here.

    `work` should spend its time in a kernel that releases the GIL. In torch's OpenMP team the indices are pulled
    from a shared counter, so every index runs even when the team is smaller than asked (e.g. inside another
    parallel region, where libgomp gives a team of one).
    """
    if count <= 1 or _forked:
        for i in range(count):
            work(i)
        return
    parallel = _team_parallel()
    if parallel is None:
        futures = [worker_pool().submit(work, i) for i in range(1, count)]
        try:
            work(0)
        finally:
            for future in futures:
                future.exception()  # waits, whatever happened in this thread
        for future in futures:
            future.result()  # re-raises a thread's error
        return
    indices = itertools.count()  # next() on it is atomic under the GIL
    errors: list[BaseException] = []

    def body(_data: int | None) -> None:
        while True:
            i = next(indices)
            if i >= count or errors:
                return
            try:
                work(i)
            except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread below
                errors.append(error)
                return

    callback = _CALLBACK(body)  # kept alive by this frame until GOMP_parallel returns
    parallel(callback, None, count, 0)  # ctypes releases the GIL for the call; the team re-acquires it per callback
    if errors:
        raise errors[0]


def run_over_rows(work: Callable[[int, int], None], rows: int, vocab: int) -> None:
    """Call `work(start, end)` on contiguous slices of `rows` vocabulary-sized rows, one per thread (up to
    `torch.get_num_threads()`, each with at least ~1M entries), through `run_threads`."""
    threads = max(1, min(torch.get_num_threads(), rows, rows * vocab // _MIN_ELEMENTS_PER_THREAD))
    bounds = [rows * i // threads for i in range(threads + 1)]
    run_threads(lambda i: work(bounds[i], bounds[i + 1]), threads)
