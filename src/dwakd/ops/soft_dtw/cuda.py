"""Hook for a CUDA Soft-DTW kernel (anti-diagonal sweep, one block per sequence): not implemented in this build.

No GPU was available to develop and test it. On CUDA tensors `impl="auto"` uses the PyTorch reference, and
`impl="cpu"` runs the fast CPU kernels on a host copy and returns results on the input device.
"""

from __future__ import annotations

import torch

from dwakd.ops.soft_dtw.band import SoftBand


def soft_dtw_cuda_groups(
    costs: list[torch.Tensor],
    lengths: list[tuple[torch.Tensor, torch.Tensor]],
    gamma: float,
    band: SoftBand | None = None,
) -> tuple[torch.Tensor, ...]:
    """Would run up to three cost batches in one CUDA launch; raises NotImplementedError with the alternatives."""
    raise NotImplementedError(
        "soft_dtw impl='cuda' has no kernel yet; use impl='cpu' (fast CPU kernels, any input device) "
        "or impl='reference' (plain PyTorch on the input device)"
    )
