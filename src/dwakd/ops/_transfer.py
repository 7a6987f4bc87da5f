"""Host-to-device copies of small host tensors (lengths, index lists) that do not synchronise the stream.

A plain `tensor.to("cuda")` from pageable host memory waits until every kernel already launched on the stream has
finished (PyTorch synchronises the stream after a blocking copy), which takes away the CPU's lead over the GPU in the
middle of a step. Staged in pinned memory and copied with `non_blocking=True`, the copy is queued like a kernel;
PyTorch's caching host allocator keeps the pinned source alive until the copy has run.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`; a copy from the CPU to a GPU goes without a stream sync (any other move is a plain
    `.to`, and a tensor already there is returned as it is)."""
    device = torch.device(device)
    if tensor.device.type != "cpu" or device.type == "cpu":
        return tensor.to(device)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
