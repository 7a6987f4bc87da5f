"""Independent Soft-DTW references for the tests: naive float64 Python loops, no torch autograd involved."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with `count` torch intra-op threads (the reference's many tiny ops crawl when OpenMP spins on a
    shared, busy CPU), restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _softmin(values: list[float], gamma: float) -> float:
    """−γ log Σ exp(−v/γ) over the finite entries, stable; +inf when none is finite."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.inf
    low = min(finite)
    return low - gamma * math.log(sum(math.exp(-(v - low) / gamma) for v in finite))


def naive_soft_dtw(cost: np.ndarray, gamma: float) -> tuple[float, np.ndarray]:
    """Value R(n, m) and gradient dR/dC of one (n, m) float64 cost matrix, by forward and backward sums over paths.

    The gradient is the expected alignment E(i, j) = exp(−(α(i,j) + β(i,j) − C(i,j) − R)/γ), where α sums
    paths from (1, 1) to (i, j) and β paths from (i, j) to (n, m); this is not the E-recursion the kernels use.
    """
    n, m = cost.shape
    alpha = np.full((n + 2, m + 2), math.inf)
    alpha[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            prev = [alpha[i - 1, j - 1], alpha[i - 1, j], alpha[i, j - 1]]
            alpha[i, j] = cost[i - 1, j - 1] + _softmin(prev, gamma)
    beta = np.full((n + 2, m + 2), math.inf)
    for i in range(n, 0, -1):
        for j in range(m, 0, -1):
            nxt = [0.0] if (i == n and j == m) else [beta[i + 1, j + 1], beta[i + 1, j], beta[i, j + 1]]
            beta[i, j] = cost[i - 1, j - 1] + _softmin(nxt, gamma)
    value = alpha[n, m]
    grad = np.zeros((n, m))
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            grad[i - 1, j - 1] = math.exp(-(alpha[i, j] + beta[i, j] - cost[i - 1, j - 1] - value) / gamma)
    return value, grad


def naive_band_cost(cost: np.ndarray, center: np.ndarray, width: np.ndarray, penalty: float) -> np.ndarray:
    """C̃(i, j) = C(i, j) + ρ·[|j − c_i| > w_i] by explicit loops (0-based i, j)."""
    out = cost.copy()
    for i in range(cost.shape[0]):
        for j in range(cost.shape[1]):
            if abs(j - float(center[i])) > float(width[i]):
                out[i, j] += penalty
    return out


def naive_batch(
    cost: torch.Tensor,
    gamma: float,
    lengths_x: torch.Tensor | None = None,
    lengths_y: torch.Tensor | None = None,
    band: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values (batch,) and gradients (batch, N, M) of a padded batch by `naive_soft_dtw` per sample, float64."""
    batch, n_rows, n_cols = cost.shape
    values = torch.zeros(batch, dtype=torch.float64)
    grads = torch.zeros(batch, n_rows, n_cols, dtype=torch.float64)
    for b in range(batch):
        n = n_rows if lengths_x is None else int(lengths_x[b])
        m = n_cols if lengths_y is None else int(lengths_y[b])
        full = cost[b].detach().double().numpy()
        if band is not None:
            full = naive_band_cost(full, band.center[b].double().numpy(), band.width[b].double().numpy(), band.penalty)
        value, grad = naive_soft_dtw(full[:n, :m], gamma)
        values[b] = value
        grads[b, :n, :m] = torch.from_numpy(grad)
    return values, grads


def random_batch(
    batch: int, n_rows: int, n_cols: int, seed: int, dtype: torch.dtype = torch.float64, ragged: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine-like costs in [0, 2] (batch, N, M) and ragged lengths (sample 0 always full) from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    cost = (2.0 * torch.rand(batch, n_rows, n_cols, generator=gen, dtype=torch.float64)).to(dtype)
    if not ragged:
        return cost, torch.full((batch,), n_rows), torch.full((batch,), n_cols)
    lengths_x = torch.randint(1, n_rows + 1, (batch,), generator=gen)
    lengths_y = torch.randint(1, n_cols + 1, (batch,), generator=gen)
    lengths_x[0], lengths_y[0] = n_rows, n_cols
    return cost, lengths_x, lengths_y


def random_band(batch: int, n_rows: int, n_cols: int, seed: int, penalty: float = 1.0):
    """A SoftBand with centres near the linear diagonal and widths of a few columns."""
    from dwakd.ops.soft_dtw import SoftBand

    gen = torch.Generator().manual_seed(seed + 1000)
    line = torch.arange(n_rows, dtype=torch.float64) * (n_cols - 1) / max(n_rows - 1, 1)
    center = line.unsqueeze(0) + 2.0 * torch.randn(batch, n_rows, generator=gen, dtype=torch.float64)
    width = 1.0 + 3.0 * torch.rand(batch, n_rows, generator=gen, dtype=torch.float64)
    return SoftBand(center=center, width=width, penalty=penalty)


def naive_soft_dtw_on_band(cost: np.ndarray, gamma: float, half_width: int) -> tuple[float, np.ndarray]:
    """Value and gradient of soft-DTW restricted to the hard band |j − c_i| ≤ w, c_i = i·(m − 1)/(n − 1) (0-based),
    by float64 forward and backward sums over paths (as `naive_soft_dtw`), touching only the band's cells.

    Cells outside the band are +inf (their gradient is 0): this is the soft-DTW of `cost` with an infinite penalty
    outside the band, which a kernel reproduces with a SoftBand of centre c_i, width w and a penalty ρ ≫ γ. Costs
    O(n·w) Python steps: an independent reference for lengths where the dense O(n·m) loops would take minutes.
    """
    n, m = cost.shape
    centers = np.arange(n) * (m - 1) / max(n - 1, 1)
    # columns of the band per 0-based row: |j − c_i| ≤ w, as in SoftBand.outside (float64 compare)
    lo = [max(0, math.ceil(c - half_width)) for c in centers]
    hi = [min(m - 1, math.floor(c + half_width)) for c in centers]
    inside = lambda i, j: 0 <= i < n and lo[i] <= j <= hi[i]  # noqa: E731

    alpha: dict[tuple[int, int], float] = {}
    for i in range(n):
        for j in range(lo[i], hi[i] + 1):
            if i == 0 and j == 0:
                alpha[i, j] = float(cost[0, 0])
                continue
            prev = [alpha.get((i - 1, j - 1), math.inf), alpha.get((i - 1, j), math.inf),
                    alpha.get((i, j - 1), math.inf)]
            alpha[i, j] = float(cost[i, j]) + _softmin(prev, gamma)
    beta: dict[tuple[int, int], float] = {}
    for i in range(n - 1, -1, -1):
        for j in range(hi[i], lo[i] - 1, -1):
            if i == n - 1 and j == m - 1:
                beta[i, j] = float(cost[i, j])
                continue
            nxt = [beta.get(q, math.inf) for q in ((i + 1, j + 1), (i + 1, j), (i, j + 1)) if inside(*q)]
            beta[i, j] = float(cost[i, j]) + _softmin(nxt or [math.inf], gamma)
    value = alpha[n - 1, m - 1]
    grad = np.zeros((n, m))
    for (i, j), a in alpha.items():
        if math.isfinite(a) and math.isfinite(beta[i, j]):
            grad[i, j] = math.exp(-(a + beta[i, j] - float(cost[i, j]) - value) / gamma)
    return value, grad


def diagonal_band(batch: int, n_rows: int, n_cols: int, half_width: float, penalty: float):
    """A SoftBand along the straight diagonal c_i = i·(m − 1)/(n − 1) with a constant half-width (every sample)."""
    from dwakd.ops.soft_dtw import SoftBand

    center = (torch.arange(n_rows, dtype=torch.float64) * (n_cols - 1) / max(n_rows - 1, 1)).repeat(batch, 1)
    return SoftBand(center=center, width=torch.full((batch, n_rows), float(half_width), dtype=torch.float64),
                    penalty=penalty)  # fmt: skip
