"""Public Soft-DTW entry points: argument checks, dispatch between the reference and the fast paths, divergence."""

from __future__ import annotations

import torch

from dwakd.ops.soft_dtw.band import SoftBand
from dwakd.ops.soft_dtw.cost import cosine_cost
from dwakd.ops.soft_dtw.reference import soft_dtw_reference

IMPLS = ("auto", "reference", "cpu", "cuda")


def _check_lengths(lengths: torch.Tensor | None, batch: int, size: int, name: str, device: torch.device) -> torch.Tensor:
    """Validated (batch,) int64 lengths on `device`, each in [1, size]; None means every sample is full."""
    if lengths is None:
        return torch.full((batch,), size, dtype=torch.long, device=device)
    lengths = torch.as_tensor(lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {lengths.dtype}")
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > size:
        raise ValueError(f"{name} must lie in [1, {size}], got values in [{lo}, {hi}]")
    return lengths.to(device=device, dtype=torch.long)


def _resolve_impl(impl: str, device: torch.device) -> str:
    """Turn 'auto' into the fastest available path for `device`; check explicit choices."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "reference"
    return impl


def soft_dtw(
    cost: torch.Tensor,
    gamma: float,
    lengths_x: torch.Tensor | None = None,
    lengths_y: torch.Tensor | None = None,
    band: SoftBand | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Soft-DTW R(n_b, m_b) of each (batch, N, M) cost matrix, (batch,), differentiable w.r.t. `cost`."""
    if cost.dim() != 3:
        raise ValueError(f"cost must be (batch, N, M), got shape {tuple(cost.shape)}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    batch, n_rows, n_cols = cost.shape
    lengths_x = _check_lengths(lengths_x, batch, n_rows, "lengths_x", cost.device)
    lengths_y = _check_lengths(lengths_y, batch, n_cols, "lengths_y", cost.device)
    if band is not None:
        band.validate(batch, n_rows)
    path = _resolve_impl(impl, cost.device)
    if path == "reference":
        return soft_dtw_reference(cost, float(gamma), lengths_x, lengths_y, band)
    raise NotImplementedError(f"soft_dtw impl={path!r} is not available yet; use impl='reference'")


def soft_dtw_divergence(
    x: torch.Tensor,
    y: torch.Tensor,
    gamma: float,
    lengths_x: torch.Tensor | None = None,
    lengths_y: torch.Tensor | None = None,
    band: SoftBand | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """D = sdtw(C̃_xy) − ½(sdtw(C_xx) + sdtw(C_yy)) with cosine costs, (batch,); the band only on the cross term."""
    if x.dim() != 3 or y.dim() != 3:
        raise ValueError(f"x and y must be (batch, len, dim), got {tuple(x.shape)} and {tuple(y.shape)}")
    cost_xy = cosine_cost(x, y)  # (batch, N, M)
    cost_xx = cosine_cost(x, x)  # (batch, N, N)
    cost_yy = cosine_cost(y, y)  # (batch, M, M)
    cross = soft_dtw(cost_xy, gamma, lengths_x, lengths_y, band=band, impl=impl)
    self_x = soft_dtw(cost_xx, gamma, lengths_x, lengths_x, impl=impl)
    self_y = soft_dtw(cost_yy, gamma, lengths_y, lengths_y, impl=impl)
    return cross - 0.5 * (self_x + self_y)
