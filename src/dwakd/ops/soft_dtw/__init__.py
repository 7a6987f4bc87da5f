"""Soft-DTW operators (docs/methods.md#8-soft-dtw): value, divergence, cosine cost and the soft band.

`soft_dtw(cost, gamma, lengths_x, lengths_y, band, impl)` returns R(n_b, m_b) per sample; `impl="auto"` picks
the fastest path for the cost's device and `impl="reference"` the plain-PyTorch ground truth.
"""

from dwakd.ops.soft_dtw.band import SoftBand
from dwakd.ops.soft_dtw.cost import cosine_cost
from dwakd.ops.soft_dtw.functional import soft_dtw, soft_dtw_divergence
from dwakd.ops.soft_dtw.reference import soft_dtw_reference

__all__ = ["SoftBand", "cosine_cost", "soft_dtw", "soft_dtw_divergence", "soft_dtw_reference"]
