"""Peak tensor memory of one call, on CUDA and on CPU, counted by the allocator (not the process RSS).

- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus what was allocated before.
- CPU: PyTorch has no CPU peak counter, so the call runs under `torch.profiler` with `profile_memory=True`;
  every allocation and free of the CPU allocator is then recorded with the allocator's running total of live
  bytes, and the peak is the largest total seen minus the total before the first event. This counts exactly
  the tensors created during the call (in any thread), independent of glibc/RSS caching, so a (rows, V)
  temporary of 600 MB shows as 600 MB even if it lives for a millisecond.
The profiler adds a small per-allocation cost: time a call in a separate, unprofiled run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _allocation_events(prof: Any) -> list[tuple[int, int, int]]:
    """(time ns, running total bytes, signed size) of every CPU allocator event in a finished profile."""
    # private, but torch.profiler's own memory tools read the same event tree
    from torch._C._profiler import _EventType

    found: list[tuple[int, int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            if fields.device.type == "cpu":
                found.append((event.start_time_ns, fields.total_allocated, fields.alloc_size))
        stack.extend(event.children)
    found.sort()
    return found


def peak_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int]:
    """(fn's result, peak bytes of tensor memory allocated during the call above what was live before it)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        raise ValueError(f"peak_bytes measures CPU or CUDA memory, not {device.type!r}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = _allocation_events(prof)
    if not events:
        return result, 0
    _, first_total, first_size = events[0]
    baseline = first_total - first_size  # live bytes just before the first event
    return result, max(0, max(total for _, total, _ in events) - baseline)
