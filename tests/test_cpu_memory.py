"""dwakd.cpu_memory: a freed large CPU tensor's memory is reused by the next one instead of being faulted in again."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from dwakd import cpu_memory

SRC = str(Path(__file__).resolve().parents[1] / "src")
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# a fresh process (the setting is process-wide) allocates and frees a 128 MiB tensor, with small allocations in
# between, 32 times; page faults of each allocation. The heap first grows (a freed block loses a few bytes to a
# small allocation and no longer fits the next one), then serves the same blocks again.
PROBE = """
import json, resource, torch
from dwakd.cpu_memory import keep_freed_cpu_memory
applied = keep_freed_cpu_memory()
faults, addresses = [], []
for _ in range(32):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(128 * 2**20 // 4)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(policy: str) -> dict:
    env = {**os.environ, "DWAKD_CPU_MALLOC": policy, "PYTHONPATH": SRC}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    kept, system = _probe("keep"), _probe("system")
    assert kept["applied"] and not system["applied"]
    pages = 128 * 2**20 // 4096
    assert max(kept["faults"][-3:]) < pages // 100, kept  # steady state: blocks come back from the heap, mapped
    if min(system["faults"][-3:]) > pages // 10:  # 4-KiB pages (with transparent huge pages always on, both small)
        assert min(system["faults"][-3:]) > 20 * max(1, *kept["faults"][-3:]), (system, kept)


def test_policy_comes_from_the_environment_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.delenv(cpu_memory.CPU_MALLOC_ENV, raising=False)
    assert cpu_memory.cpu_malloc_policy() == "system" and not cpu_memory.keep_freed_cpu_memory()  # opt-in
    monkeypatch.setenv(cpu_memory.CPU_MALLOC_ENV, "Keep")
    assert cpu_memory.cpu_malloc_policy() == "keep"
    monkeypatch.setenv(cpu_memory.CPU_MALLOC_ENV, "jemalloc")
    with pytest.raises(ValueError, match="DWAKD_CPU_MALLOC='jemalloc'"):
        cpu_memory.cpu_malloc_policy()
