"""Plain-PyTorch Soft-DTW (Cuturi & Blondel 2017): exact, autograd-differentiable, the ground truth for the fast paths.

Sweeps anti-diagonals d = i + j (1-based cells) so each step is one vectorised log-sum-exp over the batch and
the diagonal; autograd records the recursion, so memory is O(B·(N+M)·N) and speed is modest: use it in tests.
"""

from __future__ import annotations

import torch

from dwakd.ops.soft_dtw.band import SoftBand

# Stand-in for +inf outside the DP grid: finite so log-sum-exp and its gradient never see inf − inf.
_BIG = 1e10


def soft_dtw_reference(
    cost: torch.Tensor,
    gamma: float,
    lengths_x: torch.Tensor | None = None,
    lengths_y: torch.Tensor | None = None,
    band: SoftBand | None = None,
) -> torch.Tensor:
    """Soft-DTW value R(n_b, m_b) per sample, (batch,), from a (batch, N, M) cost; padding gets zero gradient."""
    batch, n_rows, n_cols = cost.shape
    device, dtype = cost.device, cost.dtype
    if lengths_x is None:
        lengths_x = torch.full((batch,), n_rows, dtype=torch.long, device=device)
    if lengths_y is None:
        lengths_y = torch.full((batch,), n_cols, dtype=torch.long, device=device)
    lengths_x = lengths_x.to(device=device, dtype=torch.long)
    lengths_y = lengths_y.to(device=device, dtype=torch.long)

    if band is not None:
        cost = band.apply(cost)
    # Padding cells are replaced (not multiplied) by 0 so a non-finite pad can never leak into the gradient.
    rows = torch.arange(n_rows, device=device)
    cols = torch.arange(n_cols, device=device)
    valid = (rows.view(1, -1, 1) < lengths_x.view(-1, 1, 1)) & (cols.view(1, 1, -1) < lengths_y.view(-1, 1, 1))
    cost = torch.where(valid, cost, torch.zeros((), dtype=dtype, device=device))

    # Skew the cost into diagonal-major order: skewed[b, d, i] = C(i, d − i) in 1-based cells, i = 0..N.
    n_diags = n_rows + n_cols + 1
    d_idx = torch.arange(n_diags, device=device).view(-1, 1)  # (diags, 1)
    i_idx = torch.arange(n_rows + 1, device=device).view(1, -1)  # (1, N + 1)
    j_idx = d_idx - i_idx  # (diags, N + 1)
    on_grid = (i_idx >= 1) & (j_idx >= 1) & (j_idx <= n_cols)  # (diags, N + 1)
    flat = ((i_idx - 1).clamp(0, n_rows - 1) * n_cols + (j_idx - 1).clamp(0, n_cols - 1)).view(1, -1)
    skewed = cost.reshape(batch, -1).gather(1, flat.expand(batch, -1)).view(batch, n_diags, n_rows + 1)
    # one unbind (its backward stacks once) instead of indexing per step (each would back-propagate a full-size zero)
    diagonals = skewed.unbind(1)
    big = torch.full((), _BIG, dtype=dtype, device=device)

    # Diagonal 0 holds R(0, 0) = 0; diagonal 1 holds only boundary cells (+inf).
    prev2 = torch.full((batch, n_rows + 1), _BIG, dtype=dtype, device=device)
    prev2[:, 0] = 0.0
    prev1 = torch.full((batch, n_rows + 1), _BIG, dtype=dtype, device=device)
    pad = torch.full((batch, 1), _BIG, dtype=dtype, device=device)
    end_diag = lengths_x + lengths_y  # (batch,) the diagonal of the end cell (n_b, m_b)
    value = torch.zeros(batch, dtype=dtype, device=device)
    for d in range(2, n_diags):
        # predecessors of cell (i, d − i): (i−1, j−1) on d−2 at i−1; (i−1, j) on d−1 at i−1; (i, j−1) on d−1 at i
        diag_prev = torch.cat([pad, prev2[:, :-1]], dim=1)
        up_prev = torch.cat([pad, prev1[:, :-1]], dim=1)
        stacked = torch.stack([diag_prev, up_prev, prev1], dim=-1)  # (batch, N + 1, 3)
        softmin = -gamma * torch.logsumexp(-stacked / gamma, dim=-1)
        cur = torch.where(on_grid[d], diagonals[d] + softmin, big)  # (batch, N + 1)
        value = torch.where(end_diag == d, cur.gather(1, lengths_x.view(-1, 1)).squeeze(1), value)
        prev2, prev1 = prev1, cur
    return value
