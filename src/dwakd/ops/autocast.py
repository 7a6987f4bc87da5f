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


def emulated_on_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU has no native instructions for `dtype` matmuls (bf16: AVX512-BF16 or AMX; fp16: AVX512-FP16
    or AMX-FP16), so oneDNN emulates them: on an AVX2-only EPYC an LM head's bf16 products ran 7-83x slower than
    fp32, a tiny-recipe `dskd` step 9x (benchmarks/README.md, "16-bit on a CPU"). float32/float64: never."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    if probe is None:
        return False
    try:  # a private torch API: where it is missing, assume native support rather than warn wrongly
        return not bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False
