"""Triton kernels of the GPU Soft-DTW path: anti-diagonal sweeps, one program per (group, sample) task.

Layout. A task of lengths (n, m) owns n·m float32 cells in a flat scratch buffer, stored anti-diagonal by
anti-diagonal (d = i + j, 1-based interior cells only): cell (i, j) lives at `s_off + diag_offset(d − 2) + i − lo(d)`
with lo(d) = max(1, d − m). The cells of a diagonal are independent of one another and contiguous, so every load
and store of a sweep step is coalesced. The boundary (row 0, column 0, +inf except R(0, 0) = 0) is never stored:
it comes from load masks.

Passes (all launched by `cuda.py`):
1. `skew_cost_kernel` (fully parallel): C̃ = C + ρ·[|j − c_i| > w_i] (band compare in float64, like `band.py`),
   cost loaded in its dtype (bf16, fp16, fp32, fp64) and upcast to float32, written skewed into the scratch.
2. `soft_dtw_fwd_kernel`: the DP. Each step reads C̃ of diagonal d, the neighbours R of diagonals d − 1 and d − 2
   from a small per-task ring of R rows (global memory, written by other lanes in the previous steps, hence the
   `tl.debug_barrier()` after every diagonal), writes R(d) to the ring and the softmin S = R − C̃ over C̃ in place.
3. `soft_dtw_bwd_kernel`: the Cuturi–Blondel E-recursion E(p) = Σ_successors q E(q)·exp((S(q) − R(p))/γ) from
   the stored S, with R(p) = S(p) + C̃(p) (C̃ re-skewed by pass 1 into a second buffer, E·grad_output written over
   it in place), E rows in a ring as in the forward.
4. `unskew_grad_kernel` (fully parallel): scratch → (N, M) gradient in the cost's dtype, zero at padding.

What the backward keeps (design choice): the softmin S, 4 B/cell, not the three softmin weights (12 B/cell) that
the CPU path stores. A GPU sweep is latency-bound (2N − 1 dependent steps, each a memory round trip plus a block
barrier, with a few hundred cells per step against thousands of lanes), not bandwidth- or FLOP-bound: recomputing
the three weights costs three MUFU ex2 per cell off the critical path (their inputs are prefetched a step ahead),
while storing them would keep 12 B/cell alive between forward and backward instead of 4 (S is what the forward
writes anyway, in place of C̃; the backward's re-skewed C̃ adds 4 B/cell only while it runs: peak 8 B/cell) and
triple the forward's stores. For B = 8 × 3 DPs × 2048² that is 0.4 GB kept instead of 1.2 GB.

Precision. Everything is float32 (exp2 on the special-function unit, libdevice log2). Plain float32 R loses
ulp(R)/γ in the weights as R grows along the path (R ≈ N·cost), so each diagonal is stored relative to a baseline
B(d): the value at a reference cell near the linear diagonal of d − 1 (Δ(d) = B(d) − B(d − 1) per diagonal, kept
for the backward, B summed in float64). Stored values stay O(cost) near the optimal path, where the gradient mass
is. In a float32 NumPy model of these kernels, gradient errors against float64 at γ = 0.01 were ~1e-4 (N = 512)
and ~4e-4 (N = 2048) on uniform random costs, ~3e-6 on smooth LM-like costs; plain float32 R was 3–20× worse.

Two sweep variants per kernel (constexpr SINGLE): when the longest row count fits one BLOCK, lane k owns row k + 1
for the whole sweep: the left/right neighbour and the two-step-old diagonal neighbour are the lane's own registers,
everything that does not depend on the recursion (C̃, S, Δ) is prefetched one diagonal ahead, and each step does a
single dependent global round trip (the shifted neighbour from the ring). Otherwise rows of a diagonal are processed
in BLOCK-sized chunks in a loop (any length) with all neighbours loaded from a 3-row ring.

Compiled variants. Triton compiles a kernel per combination of constexpr values and of its integer arguments being
1, divisible by 16, or neither. BLOCK, SINGLE and BLOCK_J are powers of two of the batch's widest task, and the
per-task strides of the scratch (`ring_row`, `delta_stride`) are rounded up to multiples of 16 by `cuda.py`, so
varying batch lengths (dynamic padding) reuse a few variants instead of compiling up to four per sweep kernel; the
band's row stride (the student width) only addresses float64 scalars and is `do_not_specialize`.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Stand-in for +inf outside the DP grid (as in reference.py): exp2((low − BIG)·log2e/γ) is exactly 0 for γ ≤ 1e6.
BIG = 1e10
LOG2E = 1.4426950408889634
_BIG: tl.constexpr = tl.constexpr(BIG)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _diag_offset(k, n, m):
    """Cells stored before 0-based anti-diagonal k (d = k + 2) of an n×m grid, int64 (scalar or vector k)."""
    a = tl.minimum(n, m).to(tl.int64)
    b = tl.maximum(n, m).to(tl.int64)
    k = tl.cast(k, tl.int64)
    k1 = tl.minimum(k, a)  # diagonals 0..a−1 grow by one cell each
    k2 = tl.minimum(tl.maximum(k - a, 0), b - a)  # then b − a diagonals of a cells
    k3 = tl.maximum(k - b, 0)  # then they shrink: a − 1, a − 2, ...
    return k1 * (k1 + 1) // 2 + k2 * a + k3 * (a - 1) - k3 * (k3 - 1) // 2


@triton.jit
def _cell(d, i, n, m):
    """Offset of cell (i, d − i) inside its task's skewed block (int64, i scalar or vector)."""
    return _diag_offset(d - 2, n, m) + i - tl.maximum(d - m, 1)


@triton.jit
def _pick(g, p0, p1, p2):
    """The pointer of group g (0, 1 or 2)."""
    p = p0
    if g == 1:
        p = p1
    if g == 2:
        p = p2
    return p


@triton.jit
def _softmin(a, u, lf, gamma, k):
    """−γ log(e^{−a/γ} + e^{−u/γ} + e^{−lf/γ}) with the max-subtraction (k = log2(e)/γ)."""
    low = tl.minimum(tl.minimum(a, u), lf)
    s = tl.exp2((low - a) * k) + tl.exp2((low - u) * k) + tl.exp2((low - lf) * k)
    return low - (gamma * _LN2) * tl.log2(s)


@triton.jit
def _shifted(r_p, dl1, dl2):
    """R(p) in the frames of its successors on d + 1 and d + 2, rounded exactly as the forward shifted it.

    The forward's softmin saw fl(R(p) − Δ(d + 1)) and fl(fl(R(p) − Δ(d + 2)) − Δ(d + 1)); repeating those roundings
    makes S(q) − shifted R(p) exactly −γ·log(sum) for the dominant predecessor instead of a difference of two
    baseline-sized numbers (an error of ulp(Δ)/γ on every weight along the path).
    """
    return r_p - dl1, r_p - dl2 - dl1


@triton.jit(do_not_specialize=["band_stride"])
def skew_cost_kernel(c0, c1, c2, geom, group, sample, len_n, len_m, s_off,
                     center, width, band_stride, penalty, band_group, out,
                     BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BANDED: tl.constexpr):  # fmt: skip
    """One program per (block of BLOCK_R rows, task): C̃ of those rows, float32, into the task's skewed block.

    geom is int64 (3, 3): batch, row and column strides of each group's cost. The band (float64 (batch, rows)
    centre and width, row stride `band_stride`) applies to group `band_group` only.
    """
    r0 = tl.program_id(0) * BLOCK_R  # first 0-based row (rows are the large grid axis)
    t = tl.program_id(1)
    n = tl.load(len_n + t)
    if r0 < n:
        g = tl.load(group + t)
        b = tl.load(sample + t).to(tl.int64)
        m = tl.load(len_m + t)
        rr = r0 + tl.arange(0, BLOCK_R)
        row_ok = rr < n
        rows = _pick(g, c0, c1, c2) + b * tl.load(geom + 3 * g) + rr[:, None] * tl.load(geom + 3 * g + 1)
        col_stride = tl.load(geom + 3 * g + 2)
        dst = out + tl.load(s_off + t)
        i = rr[:, None] + 1
        if BANDED:
            band_rows = tl.where(g == band_group, n, 0)  # other groups: an infinite width, nothing is outside
            c_i = tl.load(center + b * band_stride + rr, mask=rr < band_rows, other=0.0)[:, None]
            w_i = tl.load(width + b * band_stride + rr, mask=rr < band_rows, other=float("inf"))[:, None]
        for j0 in range(0, m, BLOCK_J):
            jj = j0 + tl.arange(0, BLOCK_J)[None, :]  # 0-based columns
            ok = row_ok[:, None] & (jj < m)
            c = tl.load(rows + jj * col_stride, mask=ok, other=0.0).to(tl.float32)
            if BANDED:
                c = tl.where(tl.abs(jj.to(tl.float64) - c_i) > w_i, c + penalty, c)
            tl.store(dst + _cell(i + jj + 1, i, n, m), c, mask=ok)


@triton.jit
def unskew_grad_kernel(g0, g1, g2, geom, shape, group, sample, len_n, len_m, s_off, src,
                       BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):  # fmt: skip
    """One program per (block of BLOCK_R rows < N_g, task): gradient rows from the skewed block, 0 beyond (n, m).

    geom is int64 (3, 3) strides of each group's gradient, shape int64 (3, 3) its (N_g, M_g, unused).
    """
    r0 = tl.program_id(0) * BLOCK_R
    t = tl.program_id(1)
    g = tl.load(group + t)
    n_rows = tl.load(shape + 3 * g)
    if r0 < n_rows:
        cols = tl.load(shape + 3 * g + 1)
        b = tl.load(sample + t).to(tl.int64)
        n = tl.load(len_n + t)
        m = tl.load(len_m + t)
        rr = r0 + tl.arange(0, BLOCK_R)
        rows = _pick(g, g0, g1, g2) + b * tl.load(geom + 3 * g) + rr[:, None] * tl.load(geom + 3 * g + 1)
        col_stride = tl.load(geom + 3 * g + 2)
        base = src + tl.load(s_off + t)
        i = rr[:, None] + 1
        m_row = tl.where(rr < n, m, 0)[:, None]  # valid columns of each row
        for j0 in range(0, cols, BLOCK_J):
            jj = j0 + tl.arange(0, BLOCK_J)[None, :]
            inside = (rr[:, None] < n_rows) & (jj < cols)
            e = tl.load(base + _cell(i + jj + 1, i, n, m), mask=inside & (jj < m_row), other=0.0)
            tl.store(rows + jj * col_stride, e, mask=inside)


@triton.jit
def _baseline_step(ring_row_ptr, d, n, m):
    """Δ(d): the stored value of diagonal d − 1 at its reference row (nearest the linear diagonal); 0 for d = 2."""
    dp = d - 1
    ref = (dp * n + (n + m) // 2) // (n + m)
    ref = tl.minimum(tl.maximum(ref, tl.maximum(dp - m, 1)), tl.minimum(n, dp - 1))
    return tl.load(ring_row_ptr + ref, mask=d >= 3, other=0.0)


@triton.jit
def soft_dtw_fwd_kernel(len_n, len_m, s_off, buf, ring, ring_row, delta, delta_stride, values, gamma, k,
                        BLOCK: tl.constexpr, SINGLE: tl.constexpr):  # fmt: skip
    """Forward DP of task `program_id`: buf holds C̃ skewed on entry and S = R − C̃ (relative) on exit.

    Writes Δ(d) to delta[t, d] and R(n, m) (float64, absolute) to values[t]. ring: 3 rows of `ring_row` floats per
    task, indexed by row i. k = log2(e)/γ.
    """
    t = tl.program_id(0)
    n = tl.load(len_n + t)
    m = tl.load(len_m + t)
    base = buf + tl.load(s_off + t)
    ring_t = ring + t.to(tl.int64) * (3 * ring_row)
    delta_t = delta + t.to(tl.int64) * delta_stride
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros((), dtype=tl.float64)  # B(d), the baseline, in float64
    dl_prev = tl.zeros((), dtype=tl.float32)  # Δ(d − 1)
    if SINGLE:
        rows = lanes + 1  # lane k owns row k + 1
        r_own = tl.full((BLOCK,), _BIG, tl.float32)  # R(i, j − 1) of this lane (relative to B(d − 1))
        r_diag = tl.where(rows == 1, 0.0, _BIG)  # R(i − 1, j − 1) (relative to B(d − 2)); R(0, 0) = 0
        c_next = tl.load(base + rows - 1, mask=rows == 1, other=0.0)  # C̃ of diagonal 2: cell (1, 1)
        for d in range(2, n + m + 1):
            lo = tl.maximum(d - m, 1)
            hi = tl.minimum(n, d - 1)
            valid = (rows >= lo) & (rows <= hi)
            c = c_next
            lo1 = tl.maximum(d + 1 - m, 1)
            hi1 = tl.minimum(n, d)
            c_next = tl.load(base + _cell(d + 1, rows, n, m), mask=(rows >= lo1) & (rows <= hi1), other=0.0)
            prev_row = ring_t + ((d - 1) % 2) * ring_row
            dl = _baseline_step(prev_row, d, n, m)
            r_up = tl.load(prev_row + rows - 1, mask=valid & (rows >= 2), other=_BIG)  # R(i − 1, j), lane i − 1
            s = _softmin(r_diag - dl - dl_prev, r_up - dl, r_own - dl, gamma, k)
            r_new = c + s
            tl.store(ring_t + (d % 2) * ring_row + rows, r_new, mask=valid)
            tl.store(base + _cell(d, rows, n, m), s, mask=valid)
            tl.store(delta_t + d, dl)
            r_own = tl.where(valid, r_new, _BIG)
            r_diag = r_up
            acc += dl.to(tl.float64)
            dl_prev = dl
            tl.debug_barrier()  # R(d) of every lane is in the ring before any lane reads it
        last = tl.load(ring_t + ((n + m) % 2) * ring_row + n)
    else:
        for d in range(2, n + m + 1):
            lo = tl.maximum(d - m, 1)
            hi = tl.minimum(n, d - 1)
            prev_row = ring_t + ((d - 1) % 3) * ring_row
            prev2_row = ring_t + ((d - 2) % 3) * ring_row
            out_row = ring_t + (d % 3) * ring_row
            dl = _baseline_step(prev_row, d, n, m)
            for start in range(lo, hi + 1, BLOCK):
                i = start + lanes
                valid = i <= hi
                j = d - i
                c = tl.load(base + _cell(d, i, n, m), mask=valid, other=0.0)
                r_up = tl.load(prev_row + i - 1, mask=valid & (i >= 2), other=_BIG)
                r_left = tl.load(prev_row + i, mask=valid & (j >= 2), other=_BIG)
                r_dg = tl.load(prev2_row + i - 1, mask=valid & (i >= 2) & (j >= 2), other=_BIG)
                r_dg = tl.where((i == 1) & (j == 1), 0.0, r_dg)  # R(0, 0) = 0
                s = _softmin(r_dg - dl - dl_prev, r_up - dl, r_left - dl, gamma, k)
                tl.store(out_row + i, c + s, mask=valid)
                tl.store(base + _cell(d, i, n, m), s, mask=valid)
            tl.store(delta_t + d, dl)
            acc += dl.to(tl.float64)
            dl_prev = dl
            tl.debug_barrier()
        last = tl.load(ring_t + ((n + m) % 3) * ring_row + n)
    tl.store(values + t, last.to(tl.float64) + acc)


@triton.jit
def soft_dtw_bwd_kernel(len_n, len_m, s_off, sbuf, cbuf, ring, ring_row, delta, delta_stride, scale_ptr, k,
                        BLOCK: tl.constexpr, SINGLE: tl.constexpr):  # fmt: skip
    """E-recursion of task `program_id`: cbuf holds C̃ skewed on entry and scale·E = dL/dC̃ on exit.

    sbuf: the forward's S (relative to the baselines Δ in delta). The weight of cell p in successor q is
    exp((S(q) − R(p))/γ) with R(p) = S(p) + C̃(p), shifted by the baselines between their diagonals.
    """
    t = tl.program_id(0)
    n = tl.load(len_n + t)
    m = tl.load(len_m + t)
    off = tl.load(s_off + t)
    s_base = sbuf + off
    c_base = cbuf + off
    ring_t = ring + t.to(tl.int64) * (3 * ring_row)
    delta_t = delta + t.to(tl.int64) * delta_stride
    scale = tl.load(scale_ptr + t)
    lanes = tl.arange(0, BLOCK)
    last = n + m
    dl1 = tl.zeros((), dtype=tl.float32)  # Δ(d + 1)
    dl2 = tl.zeros((), dtype=tl.float32)  # Δ(d + 2)
    if SINGLE:
        rows = lanes + 1
        # prefetched for diagonal d (the loop starts at the end cell, alone on diagonal n + m)
        at_end = rows == n
        s_p_next = tl.load(s_base + _cell(last, rows, n, m), mask=at_end, other=0.0)  # S(i, j)
        c_p_next = tl.load(c_base + _cell(last, rows, n, m), mask=at_end, other=0.0)  # C̃(i, j)
        s_dn_next = tl.zeros((BLOCK,), tl.float32)  # S(i + 1, j): none for the end cell
        dl_next = tl.load(delta_t + last)  # Δ(d)
        e_own = tl.zeros((BLOCK,), tl.float32)  # E(i, j + 1): this lane's previous output
        s_own = tl.zeros((BLOCK,), tl.float32)  # S(i, j + 1)
        e_dg = tl.zeros((BLOCK,), tl.float32)  # E(i + 1, j + 1): lane i + 1's output two steps ago
        s_dg = tl.zeros((BLOCK,), tl.float32)  # S(i + 1, j + 1)
        for step in range(last - 1):
            d = last - step
            lo = tl.maximum(d - m, 1)
            hi = tl.minimum(n, d - 1)
            valid = (rows >= lo) & (rows <= hi)
            j = d - rows
            s_p = s_p_next
            c_p = c_p_next
            s_dn = s_dn_next
            dl0 = dl_next
            # prefetch what diagonal d − 1 needs (none of it depends on the recursion)
            lo1 = tl.maximum(d - 1 - m, 1)
            hi1 = tl.minimum(n, d - 2)
            valid1 = (rows >= lo1) & (rows <= hi1)
            s_p_next = tl.load(s_base + _cell(d - 1, rows, n, m), mask=valid1, other=0.0)
            c_p_next = tl.load(c_base + _cell(d - 1, rows, n, m), mask=valid1, other=0.0)
            s_dn_next = tl.load(s_base + _cell(d, rows + 1, n, m), mask=valid1 & (rows < n), other=0.0)
            dl_next = tl.load(delta_t + d - 1)
            # the one dependent load: E(i + 1, j) from lane i + 1's previous step
            ok_dn = valid & (rows < n)
            ok_rt = valid & (j < m)
            ok_dg = ok_dn & (j < m)
            e_dn = tl.load(ring_t + ((d + 1) % 2) * ring_row + rows + 1, mask=ok_dn, other=0.0)
            r_p = s_p + c_p  # bitwise the forward's R(p)
            p1, p2 = _shifted(r_p, dl1, dl2)
            w_dn = tl.exp2((s_dn - p1) * k)
            w_rt = tl.exp2((s_own - p1) * k)
            w_dg = tl.exp2((s_dg - p2) * k)
            e = tl.where(ok_dn, e_dn * w_dn, 0.0) + tl.where(ok_rt, e_own * w_rt, 0.0)
            e = e + tl.where(ok_dg, e_dg * w_dg, 0.0)
            e = tl.where((rows == n) & (j == m), 1.0, e)
            tl.store(ring_t + (d % 2) * ring_row + rows, e, mask=valid)
            tl.store(c_base + _cell(d, rows, n, m), e * scale, mask=valid)
            e_own = tl.where(valid, e, 0.0)
            s_own = s_p
            e_dg = e_dn
            s_dg = s_dn
            dl2 = dl1
            dl1 = dl0
            tl.debug_barrier()  # E(d) of every lane is in the ring before any lane reads it
    else:
        for step in range(last - 1):
            d = last - step
            lo = tl.maximum(d - m, 1)
            hi = tl.minimum(n, d - 1)
            row1 = ring_t + ((d + 1) % 3) * ring_row
            row2 = ring_t + ((d + 2) % 3) * ring_row
            out_row = ring_t + (d % 3) * ring_row
            dl1 = tl.load(delta_t + d + 1)  # Δ(d + 1) and Δ(d + 2): zero past the end diagonal
            dl2 = tl.load(delta_t + d + 2)
            for start in range(lo, hi + 1, BLOCK):
                i = start + lanes
                valid = i <= hi
                j = d - i
                ok_dn = valid & (i < n)
                ok_rt = valid & (j < m)
                ok_dg = ok_dn & (j < m)
                s_p = tl.load(s_base + _cell(d, i, n, m), mask=valid, other=0.0)
                c_p = tl.load(c_base + _cell(d, i, n, m), mask=valid, other=0.0)
                s_dn = tl.load(s_base + _cell(d + 1, i + 1, n, m), mask=ok_dn, other=0.0)
                s_rt = tl.load(s_base + _cell(d + 1, i, n, m), mask=ok_rt, other=0.0)
                s_dg = tl.load(s_base + _cell(d + 2, i + 1, n, m), mask=ok_dg, other=0.0)
                e_dn = tl.load(row1 + i + 1, mask=ok_dn, other=0.0)
                e_rt = tl.load(row1 + i, mask=ok_rt, other=0.0)
                e_dg = tl.load(row2 + i + 1, mask=ok_dg, other=0.0)
                r_p = s_p + c_p
                p1, p2 = _shifted(r_p, dl1, dl2)
                w_dn = tl.exp2((s_dn - p1) * k)
                w_rt = tl.exp2((s_rt - p1) * k)
                w_dg = tl.exp2((s_dg - p2) * k)
                e = tl.where(ok_dn, e_dn * w_dn, 0.0) + tl.where(ok_rt, e_rt * w_rt, 0.0)
                e = e + tl.where(ok_dg, e_dg * w_dg, 0.0)
                e = tl.where((i == n) & (j == m), 1.0, e)
                tl.store(out_row + i, e, mask=valid)
                tl.store(c_base + _cell(d, i, n, m), e * scale, mask=valid)
            tl.debug_barrier()
