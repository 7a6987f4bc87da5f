"""ops._threads.run_threads: every index runs once, concurrently, in torch's OpenMP team where torch uses libgomp."""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import threading
import time

import pytest
import torch
from _soft_dtw_helpers import torch_threads

from dwakd.ops import _threads
from dwakd.ops._threads import ops_threads, ops_threads_mode, run_threads, uses_openmp_team

MODES = ("openmp", "python")
LINUX_GOMP = platform.system() == "Linux" and "parallel backend: OpenMP" in torch.__config__.parallel_info()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("count", [0, 1, 2, 5])
def test_every_index_runs_once(mode: str, count: int) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        with lock:
            seen.append(i)

    with ops_threads(mode):
        run_threads(work, count)
    assert sorted(seen) == list(range(count))


@pytest.mark.parametrize("mode", MODES)
def test_two_indices_run_at_the_same_time(mode: str) -> None:
    """Both must be inside `work` at once to pass the barrier; run one after the other, it times out."""
    barrier = threading.Barrier(2, timeout=20)
    with ops_threads(mode), torch_threads(2):
        run_threads(lambda i: barrier.wait(), 2)


@pytest.mark.parametrize("mode", MODES)
def test_an_error_in_any_thread_is_raised_in_the_caller(mode: str) -> None:
    def work(i: int) -> None:
        if i == 1:
            raise KeyError("index 1 failed")

    with ops_threads(mode), pytest.raises(KeyError, match="index 1 failed"):
        run_threads(work, 2)


@pytest.mark.parametrize("mode", MODES)
def test_a_nested_call_still_runs_every_index(mode: str) -> None:
    """Inside a parallel region libgomp gives a team of one: the indices are pulled, so all of them still run."""
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def inner(outer: int, i: int) -> None:
        with lock:
            seen.append((outer, i))

    with ops_threads(mode):
        run_threads(lambda outer: run_threads(lambda i: inner(outer, i), 3), 2)
    assert sorted(seen) == [(o, i) for o in range(2) for i in range(3)]


@pytest.mark.skipif(not LINUX_GOMP, reason="torch here does not run its CPU ops in a libgomp team")
def test_openmp_mode_runs_in_torchs_own_team() -> None:
    """The work runs inside libgomp's parallel region of torch's runtime, so torch's idle (spinning) workers take
    it; the Python pool's threads are outside any region."""
    assert uses_openmp_team()
    gomp = ctypes.CDLL(_threads._torch_libgomp_path())
    inside: dict[str, list[int]] = {}
    for mode in MODES:
        flags: list[int] = []
        with ops_threads(mode), torch_threads(2):
            run_threads(lambda i: flags.append(gomp.omp_in_parallel()), 2)  # noqa: B023
        inside[mode] = flags
    assert inside["openmp"] == [1, 1]
    assert inside["python"] == [0, 0]


def test_mode_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DWAKD_OPS_THREADS", "python")
    assert ops_threads_mode() == "python"
    assert not uses_openmp_team()
    monkeypatch.setenv("DWAKD_OPS_THREADS", "tbb")
    with pytest.raises(ValueError, match="DWAKD_OPS_THREADS='tbb'"):
        run_threads(lambda i: None, 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        with ops_threads("tbb"):
            pass


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("mode", MODES)
def test_a_forked_child_runs_every_index_instead_of_hanging(mode: str) -> None:
    """After a fork the parent's threads are gone (libgomp's next parallel region hangs): the child runs the
    indices in its calling thread."""
    with ops_threads(mode), torch_threads(2):
        run_threads(lambda i: None, 2)  # the parent's team / pool exists
        torch.ones(512, 512).add_(1.0)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report the indices it ran, then leave without pytest's cleanup
            try:
                seen: list[int] = []
                run_threads(seen.append, 3)
                os.write(write, bytes(sorted(seen)))
            finally:
                os._exit(0)
        os.close(write)
        deadline = time.monotonic() + 60
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung in run_threads")
            time.sleep(0.05)
        assert list(os.read(read, 16)) == [0, 1, 2]
        os.close(read)


@pytest.mark.parametrize("mode", MODES)
def test_calls_from_several_python_threads_at_once(mode: str) -> None:
    """Each calling thread gets its own team (libgomp) or shares the pool; every call runs all its indices."""
    results: dict[int, list[int]] = {}
    lock = threading.Lock()

    def caller(name: int) -> None:
        seen: list[int] = []
        for _ in range(20):
            run_threads(lambda i: seen.append(i), 3)  # noqa: B023
        with lock:
            results[name] = sorted(seen)

    with ops_threads(mode), torch_threads(2):
        callers = [threading.Thread(target=caller, args=(n,)) for n in range(3)]
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join(timeout=60)
    assert results == {n: sorted(list(range(3)) * 20) for n in range(3)}
