"""Numba kernels of the CPU Soft-DTW path: anti-diagonal sweeps over a skewed grid, one sequence pair at a time.

Layout. Each sequence pair (a "task") of lengths (n, m) owns a padded grid of (n+2)·(m+2) cells, 1-based interior
i ∈ [1, n], j ∈ [1, m], row/column 0 the DP boundary and row n+1 / column m+1 the zero boundary of the backward
pass. Cells are stored anti-diagonal by anti-diagonal (d = i + j), so every cell of a diagonal is independent of
the others and its three predecessors sit at constant offsets in the two previous diagonals: the inner loops are
contiguous and branch-free and LLVM vectorises them (AVX2/AVX-512). Cell (i, j) lives at `base[i + j] + i` with
`base[d] = offset of diagonal d − first i on d`. Kernels take a list of task ids and release the GIL; `cpu.py`
spreads the tasks over threads.

Forward: R is accumulated in float64 (so rounding in R never scales with 1/γ), the three exponentials and the log
of the softmin run in the input dtype with vectorisable polynomial kernels for float32 (libm for float64); it stores
the three softmin weights (transition probabilities) per cell in the input dtype, the only state kept for backward.
Backward: the expected-alignment recursion of Cuturi & Blondel (2017), E(i,j) = Σ_successors E(q)·w_q(i,j), which is
multiply-adds only, then un-skews E·grad_output into the (N, M) layout of the cost.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# Only contraction of a·b + c into one fused multiply-add (more accurate, not less); no reassociation and no
# finite-math assumptions.
_FMA = {"contract"}

# Stand-in for +inf on the DP boundary: exp((min − BIG)/γ) is exactly 0 for any γ ≤ 1e6 (checked by the caller),
# and BIG stays finite, so no inf − inf can appear.
BIG = 1e10

_F = np.float32
# Cephes expf/logf constants (float32 minimax polynomials, ~1 ulp on the reduced ranges).
_LOG2E = _F(1.4426950408889634)
_LN2_HI = _F(0.693359375)
_LN2_LO = _F(-2.12194440e-4)
_EXP_P = (_F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3), _F(4.1665795894e-2),
          _F(1.6666665459e-1), _F(5.0000001201e-1))  # fmt: skip
_LOG_P = (_F(7.0376836292e-2), _F(-1.1514610310e-1), _F(1.1676998740e-1), _F(-1.2420140846e-1),
          _F(1.4249322787e-1), _F(-1.6668057665e-1), _F(2.0000714765e-1), _F(-2.4999993993e-1),
          _F(3.3333331174e-1))  # fmt: skip
_X_MIN = _F(-87.0)  # below this exp underflows float32 normals; the kernel returns exactly 0
_HALF = _F(0.5)
_ONE = _F(1.0)
_ZERO = _F(0.0)
_SQRT2 = _F(1.4142135623730951)


@intrinsic
def _i32_as_f32(typingctx, bits):  # noqa: ARG001
    """Reinterpret int32 bits as a float32 (a vectorisable bitcast, used to build 2**k)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(cache=True, error_model="numpy", fastmath=_FMA, inline="always")
def _exp_nonpos_f32(x: float) -> float:
    """exp(x) for float32 x ≤ 0 without libm: Cephes range reduction + degree-6 polynomial; 0 below −87."""
    xc = max(x, _X_MIN)
    k = math.floor(xc * _LOG2E + _HALF)
    r = xc - k * _LN2_HI - k * _LN2_LO
    p0, p1, p2, p3, p4, p5 = _EXP_P
    y = (((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5) * (r * r) + r + _ONE
    y = y * _i32_as_f32((np.int32(k) + np.int32(127)) << np.int32(23))
    return y if x >= _X_MIN else _ZERO


@njit(cache=True, error_model="numpy", fastmath=_FMA, inline="always")
def _log_1to3_f32(s: float) -> float:
    """log(s) for float32 s ∈ [1, 3] (a sum of three softmin exponentials, one of them 1) without libm."""
    high = s > _SQRT2
    s = s * _HALF if high else s
    e = _ONE if high else _ZERO
    high = s > _SQRT2
    s = s * _HALF if high else s
    e = e + _ONE if high else e
    x = s - _ONE
    z = x * x
    q0, q1, q2, q3, q4, q5, q6, q7, q8 = _LOG_P
    y = ((((((((q0 * x + q1) * x + q2) * x + q3) * x + q4) * x + q5) * x + q6) * x + q7) * x + q8) * x * z
    y = y + e * _LN2_LO - _HALF * z
    return x + y + e * _LN2_HI


@njit(cache=True, error_model="numpy", fastmath=_FMA, inline="always")
def _sweep_poly32(r_diag, r_up, r_left, r_out, w_diag, w_up, w_left, gamma, inv_gamma):
    """One anti-diagonal of the forward with float32 polynomial exp/log (vectorised): R += softmin, store weights."""
    for t in range(r_out.shape[0]):
        a = r_diag[t]
        u = r_up[t]
        lf = r_left[t]
        low = a if a < u else u
        low = low if low < lf else lf
        ea = _exp_nonpos_f32(np.float32((low - a) * inv_gamma))
        eu = _exp_nonpos_f32(np.float32((low - u) * inv_gamma))
        el = _exp_nonpos_f32(np.float32((low - lf) * inv_gamma))
        s = ea + eu + el
        inv_s = _ONE / s
        r_out[t] = r_out[t] + low - gamma * _log_1to3_f32(s)
        w_diag[t] = ea * inv_s
        w_up[t] = eu * inv_s
        w_left[t] = el * inv_s


@njit(cache=True, error_model="numpy", fastmath=_FMA, inline="always")
def _sweep_libm(r_diag, r_up, r_left, r_out, w_diag, w_up, w_left, gamma, inv_gamma):
    """One anti-diagonal of the forward with libm exp/log in float64 (the float64 path, exact to double)."""
    for t in range(r_out.shape[0]):
        a = r_diag[t]
        u = r_up[t]
        lf = r_left[t]
        low = a if a < u else u
        low = low if low < lf else lf
        ea = math.exp((low - a) * inv_gamma)
        eu = math.exp((low - u) * inv_gamma)
        el = math.exp((low - lf) * inv_gamma)
        s = ea + eu + el
        inv_s = 1.0 / s
        r_out[t] = r_out[t] + low - gamma * math.log(s)
        w_diag[t] = ea * inv_s
        w_up[t] = eu * inv_s
        w_left[t] = el * inv_s


@njit(cache=True, error_model="numpy", fastmath=_FMA)
def _diagonal_bases(n: int, m: int) -> np.ndarray:
    """(n+m+3,) int64: base[d] such that cell (i, j) of the padded (n+2)×(m+2) grid is stored at base[i+j] + i."""
    base = np.empty(n + m + 3, dtype=np.int64)
    offset = 0
    for d in range(n + m + 3):
        lo = max(0, d - (m + 1))
        hi = min(n + 1, d)
        base[d] = offset - lo
        offset += hi - lo + 1
    return base


@njit(cache=True, error_model="numpy", fastmath=_FMA)
def _forward_task(cost, n, m, band_center, band_width, penalty, banded, gamma, poly32, w_diag, w_up, w_left):
    """DP of one sequence pair; fills its weights (grid-sized views) and returns R(n, m) as float64."""
    base = _diagonal_bases(n, m)
    inv_gamma = 1.0 / gamma
    size = (n + 2) * (m + 2)
    r = np.empty(size, dtype=np.float64)  # accumulated costs R on the skewed grid, float64
    zero = w_diag.dtype.type(0.0)
    # DP boundary: R(0, 0) = 0, R(0, j) = R(i, 0) = +inf; zero weights on the backward boundary row/column.
    for j in range(m + 2):
        r[base[j]] = BIG
    for i in range(1, n + 2):
        r[base[i] + i] = BIG
    r[0] = 0.0
    for j in range(m + 2):
        k = base[n + 1 + j] + n + 1
        w_diag[k] = zero
        w_up[k] = zero
        w_left[k] = zero
    for i in range(n + 2):
        k = base[i + m + 1] + i
        w_diag[k] = zero
        w_up[k] = zero
        w_left[k] = zero
    # Skew the costs into the grid (row-major read, strided write); the band penalty is added on the fly.
    for i in range(1, n + 1):
        row = cost[i - 1]
        if banded:
            c = band_center[i - 1]
            w = band_width[i - 1]
            for j in range(1, m + 1):
                r[base[i + j] + i] = row[j - 1] + (penalty if abs((j - 1) - c) > w else 0.0)
        else:
            for j in range(1, m + 1):
                r[base[i + j] + i] = row[j - 1]
    # Anti-diagonal sweep: every cell of diagonal d depends only on diagonals d−1 and d−2.
    for d in range(2, n + m + 1):
        lo = max(1, d - m)
        hi = min(n, d - 1) + 1
        k0 = base[d] + lo  # first cell (lo, d − lo) of this diagonal
        k1 = base[d - 1] + lo  # (lo, d − lo − 1): left neighbour; k1 − 1 is the upper one
        k2 = base[d - 2] + lo - 1  # (lo − 1, d − lo − 1): diagonal predecessor
        count = hi - lo
        r_diag = r[k2 : k2 + count]
        r_up = r[k1 - 1 : k1 - 1 + count]
        r_left = r[k1 : k1 + count]
        r_out = r[k0 : k0 + count]
        wd = w_diag[k0 : k0 + count]
        wu = w_up[k0 : k0 + count]
        wl = w_left[k0 : k0 + count]
        if poly32:
            _sweep_poly32(r_diag, r_up, r_left, r_out, wd, wu, wl, gamma, inv_gamma)
        else:
            _sweep_libm(r_diag, r_up, r_left, r_out, wd, wu, wl, gamma, inv_gamma)
    return r[base[n + m] + n]


@njit(nogil=True, cache=True, error_model="numpy", fastmath=_FMA)
def soft_dtw_forward(task_ids, costs0, costs1, costs2, group, sample, lengths_n, lengths_m, grid_offset,
                     band_center, band_width, penalty, band_group, gamma, poly32,
                     w_diag, w_up, w_left, values):  # fmt: skip
    """Forward of the tasks in `task_ids`, in order, without the GIL (callers run disjoint lists on threads).

    Task t reads costs{group[t]}[sample[t]] (its top-left (n, m) block), writes values[t] (float64) and its weights
    to w_*[grid_offset[t] : grid_offset[t] + (n+2)(m+2)]. The band applies to group `band_group` only.
    """
    for t in task_ids:
        g = group[t]
        b = sample[t]
        n = lengths_n[t]
        m = lengths_m[t]
        lo = grid_offset[t]
        hi = lo + (n + 2) * (m + 2)
        cost = costs0[b] if g == 0 else (costs1[b] if g == 1 else costs2[b])
        banded = g == band_group
        bb = b if banded else 0
        values[t] = _forward_task(cost, n, m, band_center[bb], band_width[bb], penalty, banded, gamma, poly32,
                                  w_diag[lo:hi], w_up[lo:hi], w_left[lo:hi])  # fmt: skip


@njit(cache=True, error_model="numpy", fastmath=_FMA, inline="always")
def _sweep_backward(e_out, e_down, w_down, e_right, w_right, e_diag, w_diag):
    """One anti-diagonal of the E-recursion: E(i,j) = E(i+1,j)·w↑ + E(i,j+1)·w← + E(i+1,j+1)·w↖ (multiply-adds)."""
    for t in range(e_out.shape[0]):
        e_out[t] = e_down[t] * w_down[t] + e_right[t] * w_right[t] + e_diag[t] * w_diag[t]


@njit(cache=True, error_model="numpy", fastmath=_FMA)
def _backward_task(n, m, w_diag, w_up, w_left, scale, grad):
    """E-recursion of one task from its weights; writes scale·E into grad (N, M), zero on padding."""
    base = _diagonal_bases(n, m)
    e = np.empty((n + 2) * (m + 2), dtype=w_diag.dtype)
    zero = w_diag.dtype.type(0.0)
    for j in range(m + 2):
        e[base[n + 1 + j] + n + 1] = zero
    for i in range(n + 2):
        e[base[i + m + 1] + i] = zero
    e[base[n + m] + n] = w_diag.dtype.type(1.0)
    for d in range(n + m - 1, 1, -1):
        lo = max(1, d - m)
        hi = min(n, d - 1) + 1
        k0 = base[d] + lo  # (lo, d − lo)
        k1 = base[d + 1] + lo  # (lo, d − lo + 1): right successor; k1 + 1 is the lower one
        k2 = base[d + 2] + lo + 1  # (lo + 1, d − lo + 1): diagonal successor
        count = hi - lo
        _sweep_backward(e[k0 : k0 + count],
                        e[k1 + 1 : k1 + 1 + count], w_up[k1 + 1 : k1 + 1 + count],
                        e[k1 : k1 + count], w_left[k1 : k1 + count],
                        e[k2 : k2 + count], w_diag[k2 : k2 + count])  # fmt: skip
    s = grad.dtype.type(scale)
    n_rows, n_cols = grad.shape
    for i in range(1, n + 1):
        row = grad[i - 1]
        for j in range(1, m + 1):
            row[j - 1] = s * e[base[i + j] + i]
        for j in range(m, n_cols):
            row[j] = zero
    for i in range(n, n_rows):
        grad[i, :] = zero


@njit(nogil=True, cache=True, error_model="numpy", fastmath=_FMA)
def soft_dtw_backward(task_ids, group, sample, lengths_n, lengths_m, grid_offset, w_diag, w_up, w_left, scale,
                      grads0, grads1, grads2):  # fmt: skip
    """Backward of the tasks in `task_ids` without the GIL: grads{group[t]}[sample[t]] = scale[t]·dR(n, m)/dC."""
    for t in task_ids:
        g = group[t]
        b = sample[t]
        n = lengths_n[t]
        m = lengths_m[t]
        lo = grid_offset[t]
        hi = lo + (n + 2) * (m + 2)
        grad = grads0[b] if g == 0 else (grads1[b] if g == 1 else grads2[b])
        _backward_task(n, m, w_diag[lo:hi], w_up[lo:hi], w_left[lo:hi], scale[t], grad)
