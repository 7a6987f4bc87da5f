"""Hard DTW over token strings with an edit-distance cost (MinED's sequence alignment), compiled with numba.

`dtw_path(cost)` follows the reference (`MinEditDisForwardKLD.dtw`, after talcs/simpledtw): accumulated cost
D(i, j) = C(i, j) + min(D(i−1, j), D(i, j−1), D(i−1, j−1)) with D starting at (0, 0), then a backtrack from
(n−1, m−1) to (0, 0) that at each cell steps to the smallest of the diagonal, (i−1, j) and (i, j−1)
predecessors, preferring them in that order on ties.

Per-step cost (benchmarks/vocab_map.py, busy 2-core CPU, Qwen × GPT-2 token strings): for one 256 × 256
response pair the edit-distance matrix (one rapidfuzz `cdist` call) takes ≈0.4 ms and the compiled DP +
backtrack ≈0.13 ms; MinED's whole alignment of a batch of 4 Dolly examples (~72 response tokens each) ≈1 ms.
Both run on CPU per sequence, off the autograd graph; the first call in a process loads numba's cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np


def edit_distance_matrix(rows: Sequence[str], cols: Sequence[str], workers: int = 1) -> np.ndarray:
    """(len(rows), len(cols)) float64 Levenshtein distances between two lists of strings (rapidfuzz)."""
    from dwakd.alignment.vocab_map import _rapidfuzz

    process, levenshtein = _rapidfuzz()
    if len(rows) == 0 or len(cols) == 0:
        return np.zeros((len(rows), len(cols)), dtype=np.float64)
    return process.cdist(list(rows), list(cols), scorer=levenshtein.distance, dtype=np.int32,
                         workers=workers).astype(np.float64)


@numba.njit(cache=True)
def _dtw_path(cost: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled; tested through dtw_path
    n, m = cost.shape
    acc = np.empty((n + 1, m + 1), dtype=np.float64)  # acc[i+1, j+1] = D(i, j); row/col 0 are the +inf border
    acc[:, :] = np.inf
    acc[0, 0] = 0.0
    for i in range(n):
        for j in range(m):
            best = acc[i, j + 1]
            if acc[i + 1, j] < best:
                best = acc[i + 1, j]
            if acc[i, j] < best:
                best = acc[i, j]
            acc[i + 1, j + 1] = cost[i, j] + best
    path = np.empty((n + m, 2), dtype=np.int64)
    i, j, k = n - 1, m - 1, 0
    while i > 0 or j > 0:
        path[k, 0] = i
        path[k, 1] = j
        k += 1
        diag = acc[i, j] if (i > 0 and j > 0) else np.inf  # D(i−1, j−1)
        up = acc[i, j + 1] if i > 0 else np.inf  # D(i−1, j)
        left = acc[i + 1, j] if j > 0 else np.inf  # D(i, j−1)
        if diag <= up and diag <= left:
            i -= 1
            j -= 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    path[k, 0] = 0
    path[k, 1] = 0
    return path[k::-1].copy()


def dtw_path(cost: np.ndarray) -> np.ndarray:
    """(steps, 2) int64 warping path [(0, 0), ..., (n−1, m−1)] of an (n, m) cost matrix; empty if n or m is 0."""
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost must be 2-D (n, m), got shape {cost.shape}")
    if cost.shape[0] == 0 or cost.shape[1] == 0:
        return np.zeros((0, 2), dtype=np.int64)
    return _dtw_path(cost)


def single_matches(path: np.ndarray, size: int, axis: int = 1) -> np.ndarray:
    """(size,) int64: each index on `axis` of the path → its only partner on the other axis, −1 if it has several.

    With rows = teacher tokens and columns = student tokens, `single_matches(path, n_student, axis=1)` is the
    reference's "one base token maps to exactly one blending token" test.
    """
    own, other = path[:, axis], path[:, 1 - axis]
    counts = np.bincount(own, minlength=size)
    out = np.full(size, -1, dtype=np.int64)
    once = counts[own] == 1
    out[own[once]] = other[once]
    return out
