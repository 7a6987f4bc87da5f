"""Host-to-device copies of small host tensors (lengths, index lists) that do not synchronise the stream.

A plain `tensor.to("cuda")` from pageable host memory waits until every kernel already launched on the stream has
finished (PyTorch synchronises the stream after a blocking copy), which takes away the CPU's lead over the GPU in the
middle of a step. Staged in pinned memory and copied with `non_blocking=True`, the copy is queued like a kernel;
PyTorch's caching host allocator keeps the pinned source alive until the copy has run.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` (on the CPU) on `device`, without a stream sync when `device` is a GPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
