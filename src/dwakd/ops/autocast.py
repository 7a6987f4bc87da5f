"""What autocast does to a matmul here: shared by the fused head op and the Soft-DTW costs, whose custom autograd
functions run their products with autocast off and so must pick its dtype themselves."""

from __future__ import annotations

import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64 (and integers) alone


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The active autocast dtype on `device_type`, or None when autocast is off there."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """Dtype a matmul of `t` (`F.linear`, `torch.bmm`) computes in here: autocast's if on (not for float64)."""
    cast = autocast_dtype(t.device.type)
    return cast if cast is not None and t.dtype in _CASTABLE else t.dtype
