"""Numba kernels of the CPU Soft-DTW path: anti-diagonal sweeps, one sequence pair ("task") at a time.

Units. The DP runs in base-2 units scaled by 1/γ: R'(i, j) = R(i, j)·log2(e)/γ, so the softmin of a cell is
R' = C' + low − log2(Σ_k 2^(low − R'_k)) with low = min_k R'_k, the three predecessors k ∈ {↖, ↑, ←} and
C' = C·log2(e)/γ: no multiply by 1/γ per cell, exp2/log2 instead of exp/log. R' is float64 (so rounding in R never
scales with 1/γ); values leave the kernel as R = R'·γ·ln 2.

Forward, per anti-diagonal d = i + j (all cells of a diagonal are independent):
1. C̃(i, d − i) of the diagonal, copied from the strip-skewed cost (below);
2. pass 1 (float64): low and the three exponents t_k = low − R'_k ≤ 0, rounded to the compute dtype;
3. pass 2 (compute dtype): 2^t_k, s = Σ_k 2^t_k ∈ [1, 3], log2 s and the three softmin weights 2^t_k / s;
4. pass 3 (float64): R' = C̃·log2(e)/γ + low − log2 s.
Passes 1–3 are separate loops over one diagonal so that pass 2 (the bulk of the work) is a pure float32 loop: LLVM
vectorises it at the full float32 width (8 lanes on AVX2, 16 on AVX-512) instead of the float64 width that one
fused loop gets. For float32, 2^t and log2 are polynomial kernels (no libm call, vectorisable; relative error
≤ 2.5e-7 for 2^t, absolute error ≤ 2e-7 for log2 on [1, 3]); for float64, libm (exact to double).

Strips. Reading an anti-diagonal straight from the row-major (N, M) cost touches one cache line per row, and
rows 4·M bytes apart (a power of two for the usual lengths) share a handful of cache sets: that gather cost as much
as the whole softmin pass. So the cost is first skewed strip by strip: rows are grouped in strips of STRIP = 16,
strips[p, j + k, k] = C̃(16p + k + 1, j), each cost row read once and contiguously, the band penalty
ρ·[|j − c_i| > w_i] added here (in float64, then rounded to the compute dtype like the reference's dense C̃). A
diagonal is then a run of whole 16-row segments, one contiguous copy each. The backward writes E through the same
layout and un-skews it into the (N, M) gradient strip by strip at the end.

Storage. R' lives in a ring of three diagonals indexed by the row i (L1-resident); the three softmin weights of
every cell (the E-recursion's input) are stored per diagonal in three planes (↖, ↑, ←) that each cover
rows lo − 1 … hi + 1 of the diagonal (zero in the two end slots, so the backward needs no bounds logic) plus
padding up to a multiple of `VL` cells: every vector loop runs over a whole number of vectors (the padding lanes
compute junk that nothing reads) instead of ending in a scalar remainder loop.

Gradient: the expected-alignment recursion of Cuturi & Blondel (2017), E(i, j) = E(i+1, j)·w↑(i+1, j) +
E(i, j+1)·w←(i, j+1) + E(i+1, j+1)·w↖(i+1, j+1), multiply-adds only, E in a ring of three diagonals, copied into
the strips and finally un-skewed into the (N, M) layout of the cost. E does not depend on dL/dR, so when a gradient
is wanted it runs inside the forward call, task by task, right after the task's DP: the weights live in a per-thread
workspace, written by the DP and read back in reverse diagonal order while they are still in cache, instead of
travelling through memory (12 B/cell out and back in) to a later backward call. The forward then keeps only E
(4 B/cell), and the backward multiplies it by dL/dR. Far from the alignment path E underflows to exactly zero
(float32, subnormals flushed; at γ = 0.1 most of the grid), so each diagonal only computes the rows its successors'
nonzero rows can reach, trimmed to its first and last nonzero row, and the un-skewing copies only those cells (the
rest of E is filled with zeros) and records each row's span of nonzero columns for the caller's products.

Symmetric tasks (the divergence's self terms, C(i, j) = C(j, i), n = m): R and E are symmetric, so only the upper
half i ≤ j is swept; on odd diagonals the one mirrored cell (k + 1, k) next to the half that the next diagonals read
is copied from (k, k + 1) (R, E, and the weights with ↑ and ← swapped), and the gradient is written to both halves.
Only the upper triangle of C is read.

Workspaces: the weights and the strips (one of each per thread, sized for the largest task of the call) come from
the caller, which keeps them between calls; the rings are allocated per task. The diagonal loops index through raw
pointers (`_ptr`), not array views: a view made in a loop with branches keeps numba's reference counting (atomic,
out-of-line calls), which cost more than the arithmetic of a 256-cell diagonal (B=8, N=M=256: 1.45 → 1.2 ms forward).

Subnormals: the kernel runs with x86's flush-to-zero and denormals-are-zero bits set in the thread's MXCSR and
restores them before it returns (`_get_fp_mode`, `_set_fp_mode`; no-ops on other targets). Far from the alignment
path the weights and E underflow below float32's smallest normal, where every operation costs a microcode assist.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from dwakd.ops._numba_math import _ONE, _exp2_nonpos_f32, _log2_pos_f32

# Only contraction of a·b + c into one fused multiply-add (more accurate, not less); no reassociation and no
# finite-math assumptions.
_FMA = {"contract"}
_OPTS = {"cache": True, "error_model": "numpy", "fastmath": _FMA}

# R' of the DP boundary (+inf) in the scaled units: 2^(low − BIG) underflows (float64) or is clamped to 2^−125 (the
# float32 kernel), and BIG stays finite, so no inf − inf appears.
BIG = 1e30
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Padding granularity of the weight planes and ring rows: a multiple of every vector width × interleave LLVM picks.
VL = 16
STRIP = 16  # rows per strip of the skewed cost / E buffers (16 float32 = one cache line per strip and diagonal)


@intrinsic
def _fetch_add(typingctx, array, index):  # noqa: ARG001
    """Atomically add 1 to the int64 array[index] and return its previous value (threads pulling chunks of work)."""
    sig = types.int64(array, index)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        array_type = signature.args[0]
        ary = context.make_array(array_type)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, array_type, ary, [args[1]])
        return builder.atomic_rmw("add", ptr, context.get_constant(types.int64, 1), "monotonic")

    return sig, codegen


# MXCSR bits: flush subnormal results to zero (FTZ, bit 15), treat subnormal inputs as zero (DAZ, bit 6)
_FTZ_DAZ = 0x8040


def _is_x86(builder) -> bool:
    """Whether the module being compiled targets x86 (the only target with an MXCSR)."""
    triple = builder.module.triple or ""
    return triple.startswith(("x86_64", "i386", "i686", "amd64"))


@intrinsic
def _get_fp_mode(typingctx):  # noqa: ARG001
    """The thread's x86 MXCSR register (0 on other targets)."""
    sig = types.uint32()

    def codegen(context, builder, signature, args):  # noqa: ARG001
        if not _is_x86(builder):
            return context.get_constant(types.uint32, 0)
        slot = cgutils.alloca_once(builder, ir.IntType(32))
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.stmxcsr")
        builder.call(fn, [builder.bitcast(slot, ir.IntType(8).as_pointer())])
        return builder.load(slot)

    return sig, codegen


@intrinsic
def _set_fp_mode(typingctx, mode):  # noqa: ARG001
    """Load the thread's x86 MXCSR register (no-op on other targets)."""
    sig = types.void(types.uint32)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        if _is_x86(builder):
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            builder.store(args[0], slot)
            fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.ldmxcsr")
            builder.call(fn, [builder.bitcast(slot, ir.IntType(8).as_pointer())])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _ptr(typingctx, array, offset):  # noqa: ARG001
    """Pointer to element `offset` of a C-contiguous array's flat data (no view, so no reference counting).

    The diagonal loops index through such pointers: an array view (a slice or a row) made in a loop that has
    branches keeps numba's reference-count increments and decrements (atomic, out of line), which cost more than
    the arithmetic of a 256-cell diagonal. The array must outlive the pointer (it is always a local of the caller).
    """
    sig = types.CPointer(array.dtype)(array, offset)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.gep(ary.data, [args[1]])

    return sig, codegen


@njit(**_OPTS)
def _layout(n, m, symmetric):
    """Per diagonal d ∈ [2, n + m]: first row lo[d], cell count cnt[d] and offset off[d] of its weight block.

    A block holds three planes (↖, ↑, ←) of `plane_size(cnt[d])` slots; slot 0 is row lo − 1 and slot q row lo + q − 1.
    A symmetric task keeps rows i ≤ d/2 only. off[n + m + 1] is the task's total size.
    """
    lo = np.zeros(n + m + 3, dtype=np.int64)
    cnt = np.zeros(n + m + 3, dtype=np.int64)
    off = np.zeros(n + m + 3, dtype=np.int64)
    total = 0
    for d in range(2, n + m + 1):
        first = max(1, d - m)
        last = min(n, d - 1)
        if symmetric:
            last = min(last, d // 2)
        lo[d] = first
        cnt[d] = last - first + 1
        off[d] = total
        total += 3 * _plane_size(last - first + 1)
    off[n + m + 1] = total
    off[n + m + 2] = total
    return lo, cnt, off


@njit(inline="always", **_OPTS)
def _padded(count):
    """count rounded up to a multiple of VL (the lanes a vector loop over `count` cells runs)."""
    return ((count + VL - 1) // VL) * VL


@njit(inline="always", **_OPTS)
def _plane_size(count):
    """Slots per weight plane of a diagonal with `count` cells: rows lo − 1 … plus the padded lanes, plus hi + 1."""
    return _padded(count) + 2


# Columns of the task table `tasks` (one int64 row per (group, sample) DP).
GROUP, SAMPLE, ROWS, COLS, SYMMETRIC = range(5)


@njit(**_OPTS)
def plan_tasks(lengths_n, lengths_m, group_sizes, symmetric_groups, min_cells):
    """Task table, weight workspace size and chunks of work for groups of per-sample lengths (concatenated).

    Returns (tasks (T, 5) int64 [group, sample, n, m, symmetric], the largest task's weight count (the per-thread
    workspace), order (T,) task ids by decreasing work, bounds (chunks + 1,): chunk c is order[bounds[c]:bounds[c + 1]],
    total cells swept). Small tasks are merged so that each chunk sweeps at least `min_cells` cells (a thread
    hand-off costs ~10 µs).
    """
    count = lengths_n.shape[0]
    tasks = np.empty((count, 5), dtype=np.int64)
    work = np.empty(count, dtype=np.int64)
    t = 0
    largest = 0
    for g in range(group_sizes.shape[0]):
        for b in range(group_sizes[g]):
            n = lengths_n[t]
            m = lengths_m[t]
            symmetric = symmetric_groups[g]
            tasks[t, GROUP] = g
            tasks[t, SAMPLE] = b
            tasks[t, ROWS] = n
            tasks[t, COLS] = m
            tasks[t, SYMMETRIC] = symmetric
            size = 0
            for d in range(2, n + m + 1):
                last = min(n, d - 1)
                if symmetric:
                    last = min(last, d // 2)
                size += 3 * _plane_size(last - max(1, d - m) + 1)
            largest = max(largest, size)
            work[t] = n * (m + 1) // 2 if symmetric else n * m
            t += 1
    order = np.argsort(-work, kind="mergesort")
    bounds = np.empty(count + 1, dtype=np.int64)
    bounds[0] = 0
    chunks = 0
    pending = 0
    for k in range(count):
        pending += work[order[k]]
        if pending >= min_cells or k == count - 1:
            chunks += 1
            bounds[chunks] = k + 1
            pending = 0
    return tasks, largest, order, bounds[: chunks + 1], work.sum()


@njit(inline="always", **_OPTS)
def _pass1(r_diag, r_up, r_left, low, t_diag, t_up, t_left, dt, count):
    """float64: low = min of the three predecessors, t_k = low − R'_k ≤ 0 rounded to the compute dtype `dt`."""
    for t in range(count):
        a = r_diag[t]
        u = r_up[t]
        lf = r_left[t]
        mn = a if a < u else u
        mn = mn if mn < lf else lf
        low[t] = mn
        t_diag[t] = dt(mn - a)
        t_up[t] = dt(mn - u)
        t_left[t] = dt(mn - lf)


@njit(inline="always", **_OPTS)
def _pass2(t_diag, t_up, t_left, log_s, w_diag, w_up, w_left, store, poly32, count):
    """compute dtype: log2 of s = Σ 2^t_k into log_s and, if `store`, the weights 2^t_k / s.

    `poly32` (float32 buffers): polynomial 2^t and log2; otherwise libm in float64.
    """
    if poly32:
        if store:
            for t in range(count):
                ea = _exp2_nonpos_f32(np.float32(t_diag[t]))
                eu = _exp2_nonpos_f32(np.float32(t_up[t]))
                el = _exp2_nonpos_f32(np.float32(t_left[t]))
                s = ea + eu + el
                inv_s = _ONE / s
                log_s[t] = _log2_pos_f32(s)
                w_diag[t] = ea * inv_s
                w_up[t] = eu * inv_s
                w_left[t] = el * inv_s
        else:
            for t in range(count):
                s = (_exp2_nonpos_f32(np.float32(t_diag[t])) + _exp2_nonpos_f32(np.float32(t_up[t]))
                     + _exp2_nonpos_f32(np.float32(t_left[t])))
                log_s[t] = _log2_pos_f32(s)
    else:
        for t in range(count):
            ea = math.exp(t_diag[t] * LN2)
            eu = math.exp(t_up[t] * LN2)
            el = math.exp(t_left[t] * LN2)
            s = ea + eu + el
            log_s[t] = math.log(s) * LOG2E
            if store:
                w_diag[t] = ea / s
                w_up[t] = eu / s
                w_left[t] = el / s


@njit(inline="always", **_OPTS)
def _pass3(cost, scale, low, log_s, r_out, count):
    """float64: R' = C̃·scale + low − log2 s."""
    for t in range(count):
        r_out[t] = np.float64(cost[t]) * scale + low[t] - log_s[t]


@njit(**_OPTS)
def _skew_strips(cost, n, m, symmetric, band_center, band_width, penalty, banded, strips):
    """strips[p, j + k, k] = C̃(16p + k + 1, j) (1-based j; only j ≥ i if symmetric): each cost row read once and
    contiguously, the writes inside one strip's (m + STRIP)·STRIP block."""
    dt = strips.dtype.type
    for p in range((n + STRIP - 1) // STRIP):
        out = strips[p]
        for k in range(min(STRIP, n - p * STRIP)):
            i = p * STRIP + k + 1
            row = cost[i - 1]
            if banded:
                c = band_center[i - 1]
                w = band_width[i - 1]
                for j in range(i if symmetric else 1, m + 1):
                    value = np.float64(row[j - 1])
                    if abs((j - 1) - c) > w:
                        value += penalty
                    out[j + k, k] = dt(value)
            else:
                for j in range(i if symmetric else 1, m + 1):
                    out[j + k, k] = row[j - 1]


@njit(inline="always", **_OPTS)
def _diagonal_from_strips(strips, d, first, last, out):
    """out[i] = strips[p, d − i0, i − i0] (i0 = 16p + 1) for the strips holding rows first … last of diagonal d,
    whole strips at a time: the extra rows get values of cells off the grid, which only padding lanes read."""
    rows = strips.shape[1]
    for p in range((first - 1) // STRIP, (last - 1) // STRIP + 1):
        i0 = p * STRIP + 1
        src = _ptr(strips, (p * rows + d - i0) * STRIP)
        dst = _ptr(out, i0)
        for k in range(STRIP):
            dst[k] = src[k]


@njit(inline="always", **_OPTS)
def _diagonal_to_strips(values, offset, d, first, last, strips):
    """strips[p, d − i0, k] = values[offset + i0 + k] for the strips holding rows first … last of diagonal d, whole
    strips at a time: the extra rows land in the slots of cells off the grid, which are never read."""
    rows = strips.shape[1]
    for p in range((first - 1) // STRIP, (last - 1) // STRIP + 1):
        i0 = p * STRIP + 1
        dst = _ptr(strips, (p * rows + d - i0) * STRIP)
        src = _ptr(values, offset + i0)
        for k in range(STRIP):
            dst[k] = src[k]


@njit(**_OPTS)
def _row_support(n, m, symmetric, lo_d, cnt_d, sup_lo, sup_hi, first_d, last_d, low_first, low_last):
    """Where each row's nonzero E can be, from the diagonals' nonzero rows [sup_lo[d], sup_hi[d]] (swept rows only: a
    symmetric task's upper half): first_d[i] … last_d[i], the diagonals that hold row i (first_d > last_d: none);
    symmetric: low_first[j] … low_last[j], the rows i < j whose upper half reaches column j (row j's mirrored
    entries)."""
    first_d[:] = n + m + 1
    last_d[:] = 0
    low_first[:] = n + 1
    low_last[:] = 0
    # plain stores through raw pointers, the last one wins (vectorised; a running min / max per cell, or array
    # indexing with its negative-index check, made this cost as much as the un-skewing itself)
    p_first, p_last, p_low_first, p_low_last = _ptr(first_d, 0), _ptr(last_d, 0), _ptr(low_first, 0), _ptr(low_last, 0)
    for d in range(2, n + m + 1):  # ascending: the last diagonal of each row, the last row of each column
        a = max(sup_lo[d], lo_d[d])
        b = min(sup_hi[d], lo_d[d] + cnt_d[d] - 1)
        for i in range(a, b + 1):
            p_last[i] = d
        if symmetric:
            for i in range(a, min(b, (d - 1) // 2) + 1):  # strictly upper cells (i, d − i), i < d − i
                p_low_last[d - i] = i
    for d in range(n + m, 1, -1):  # descending: the first ones
        a = max(sup_lo[d], lo_d[d])
        b = min(sup_hi[d], lo_d[d] + cnt_d[d] - 1)
        for i in range(a, b + 1):
            p_first[i] = d
        if symmetric:
            for i in range(a, min(b, (d - 1) // 2) + 1):
                p_low_first[d - i] = i


@njit(**_OPTS)
def _strips_to_grad(strips, n, m, symmetric, grad, spans, first_d, last_d, low_first, low_last):
    """grad[i − 1, j − 1] = E(i, j) from the strip-skewed E (both halves if symmetric), zero on padding; spans[i] =
    [lo, hi): columns that hold every nonzero entry of row i (lo ≥ hi: none; rows ≥ n have none).

    Only the cells `_row_support` says can be nonzero are read from the strips; the rest of each row is exactly
    zero (E vanishes away from the alignment path: the weights underflow and subnormals are flushed) and is filled
    as such. The spans let the caller's products with E skip those columns (`alignment_products`)."""
    dt = grad.dtype.type
    zero = dt(0.0)
    rows = strips.shape[1]
    cols = grad.shape[1]
    for i in range(spans.shape[0]):
        spans[i, 0] = m
        spans[i, 1] = 0
    for i in range(1, n + 1):
        start = i if symmetric else 1
        lo = max(start, first_d[i] - i)  # 1-based columns of the row's nonzero diagonals
        hi = min(m, last_d[i] - i)
        row = grad[i - 1]
        if symmetric:
            row[: i - 1] = zero  # the lower half: its nonzero entries are copied below
        if lo > hi:
            row[start - 1 : m] = zero
        else:
            row[start - 1 : lo - 1] = zero
            row[hi:m] = zero
            k = (i - 1) % STRIP
            src = _ptr(strips, ((i - 1) // STRIP) * rows * STRIP + k)  # src[(j + k)·STRIP] = E(i, j)
            out = _ptr(grad, (i - 1) * cols - 1)  # out[j] = grad[i − 1, j − 1]
            for j in range(lo, hi + 1):
                out[j] = dt(src[(j + k) * STRIP])
            spans[i - 1, 0] = lo - 1
            spans[i - 1, 1] = hi
        if symmetric and low_first[i] <= low_last[i]:
            spans[i - 1, 0] = min(spans[i - 1, 0], low_first[i] - 1)
            spans[i - 1, 1] = max(spans[i - 1, 1], low_last[i])
    if symmetric:  # the lower half, E(j, i) = E(i, j): per strip of columns, one contiguous run per row j
        for p in range((n + STRIP - 1) // STRIP):
            i0 = p * STRIP + 1
            j_lo = m + 1
            j_hi = 0
            for i in range(i0, min(i0 + STRIP, n + 1)):
                if first_d[i] <= last_d[i]:
                    j_lo = min(j_lo, max(i + 1, first_d[i] - i))
                    j_hi = max(j_hi, min(m, last_d[i] - i))
            for j in range(max(j_lo, i0 + 1), j_hi + 1):
                out = _ptr(grad, (j - 1) * cols + i0 - 1)  # out[k] = grad[j − 1, i0 + k − 1]
                run = _ptr(strips, (p * rows + j) * STRIP)  # run[k·(STRIP + 1)] = E(i0 + k, j)
                for k in range(min(STRIP, j - i0)):
                    out[k] = dt(run[k * (STRIP + 1)])
    for i in range(n):
        grad[i, m:] = zero
    grad[n:, :] = zero


@njit(**_OPTS)
def _forward_task(cost, n, m, symmetric, band_center, band_width, penalty, banded, scale, store, poly32, weights,
                  strips):  # fmt: skip
    """DP of one pair in scaled units: returns R'(n, m); fills `weights` (this task's block) if `store`.

    `strips`: a workspace of at least ((n + 15) // 16, m + 16, 16) in the compute dtype.
    """
    lo_d, cnt_d, off_d = _layout(n, m, symmetric)
    dt = weights.dtype.type
    width = n + 2 * VL + 2  # ring row: rows 0 … n + 1 plus the padded lanes past the last row
    ring = np.full((3, width), BIG)  # R' of diagonals d, d − 1, d − 2 (rows index the columns)
    ring[0, 0] = 0.0  # R(0, 0) = 0; everything else on the boundary is +inf
    c_buf = np.zeros(width + STRIP, dtype=weights.dtype)  # C̃ of the current diagonal by row (stale values past it)
    low = np.zeros(width)
    # t↖, t↑, t←, log2 s of the current diagonal: four separate buffers (rows of one array defeat LLVM's
    # dependence analysis and the pass-1 loop would not vectorise)
    t_diag_buf = np.zeros(width, dtype=weights.dtype)
    t_up_buf = np.zeros(width, dtype=weights.dtype)
    t_left_buf = np.zeros(width, dtype=weights.dtype)
    log_s_buf = np.zeros(width, dtype=weights.dtype)
    # without a gradient the weight stores go to a scratch buffer nobody reads
    w_target = weights if store else np.zeros(3 * width, dtype=weights.dtype)
    flat = ring.reshape(-1)
    _skew_strips(cost, n, m, symmetric, band_center, band_width, penalty, banded, strips)
    p_low = _ptr(low, 0)
    p_t_diag, p_t_up = _ptr(t_diag_buf, 0), _ptr(t_up_buf, 0)
    p_t_left, p_log_s = _ptr(t_left_buf, 0), _ptr(log_s_buf, 0)
    for d in range(2, n + m + 1):
        first = lo_d[d]
        count = cnt_d[d]
        lanes = _padded(count)
        _diagonal_from_strips(strips, d, first, first + count - 1, c_buf)
        out = (d % 3) * width  # ring rows: diagonals d, d − 1, d − 2
        prev = ((d - 1) % 3) * width
        prev2 = ((d - 2) % 3) * width
        _pass1(_ptr(ring, prev2 + first - 1), _ptr(ring, prev + first - 1), _ptr(ring, prev + first), p_low,
               p_t_diag, p_t_up, p_t_left, dt, lanes)  # fmt: skip
        plane = _plane_size(count)
        base = off_d[d]
        w_base = base + 1 if store else 0
        w_plane = plane if store else 0
        _pass2(p_t_diag, p_t_up, p_t_left, p_log_s, _ptr(w_target, w_base), _ptr(w_target, w_base + w_plane),
               _ptr(w_target, w_base + 2 * w_plane), store, poly32, lanes)  # fmt: skip
        _pass3(_ptr(c_buf, first), scale, p_low, p_log_s, _ptr(ring, out + first), lanes)
        last = first + count - 1
        if store:  # end slots: rows first − 1 and last + 1 carry zero weight (or the mirrored cell, below); the
            # last slot (written by no lane when count < lanes) too, so that every slot of the block is written
            for p in range(3):
                weights[base + p * plane] = dt(0.0)
                weights[base + p * plane + count + 1] = dt(0.0)
                weights[base + p * plane + lanes + 1] = dt(0.0)
        if symmetric and d % 2 == 1:
            # rows ≤ last = (d − 1)/2 were swept; the next diagonal reads (last + 1, last) = (last, last + 1)
            flat[out + last + 1] = flat[out + last]
            if store:
                weights[base + count + 1] = weights[base + count]
                weights[base + plane + count + 1] = weights[base + 2 * plane + count]
                weights[base + 2 * plane + count + 1] = weights[base + plane + count]
        flat[out] = BIG  # R(0, d) (the ring row held diagonal d − 3 before)
        if d <= n:
            flat[out + d] = BIG  # R(d, 0), overwritten by padding lanes
    return ring[(n + m) % 3, n]


@njit(nogil=True, **_OPTS)
def soft_dtw_forward(order, bounds, counter, tasks, costs0, costs1, costs2, band_center, band_width, penalty,
                     band_group, gamma, poly32, weights, strips, values, grads0, grads1, grads2, spans0, spans1,
                     spans2):  # fmt: skip
    """Forward (and, with a gradient, the E-recursion) of chunks of tasks without the GIL; every calling thread
    pulls the next chunk from `counter`.

    Task t reads costs{g}[b] (g, b = its group and sample; its top-left (n, m) block, only i ≤ j if symmetric) and
    writes values[t] = R(n, m) (float64). If `weights` has more than one element (a workspace of the largest task's
    weight count, one per thread), the task's softmin weights go there and the E-recursion runs right away, while
    they are still in cache: grads{g}[b] = dR(n, m)/dC (zero on padding) and spans{g}[b] (N_g, 2) int32 the
    nonzero columns [lo, hi) of each of its rows. `strips`: this thread's workspace of
    `strip_shape` for the largest task (any finite content). The band applies to group `band_group` only.
    `poly32`: float32 buffers, polynomial 2^t and log2 (see the module docstring).
    """
    scale = LOG2E / gamma
    store = weights.shape[0] > 1
    # Subnormals flushed to zero while this thread runs the kernel (restored before it returns): far from the
    # alignment path the softmin weights and E fall below 1.2e-38 (float32), and every operation on such a value
    # costs a microcode assist (~100 cycles); they would also slow the caller's matmuls on the gradient E (3× for
    # the divergence's cosine-cost backward at B=8, N=M=256, where 2 % of E was subnormal). Flushing changes values
    # by < 1.2e-38.
    fp_mode = _get_fp_mode()
    _set_fp_mode(np.uint32(fp_mode | _FTZ_DAZ))
    while True:
        chunk = _fetch_add(counter, 0)
        if chunk >= bounds.shape[0] - 1:
            break
        for k in range(bounds[chunk], bounds[chunk + 1]):
            t = order[k]
            g = tasks[t, GROUP]
            b = tasks[t, SAMPLE]
            n = tasks[t, ROWS]
            m = tasks[t, COLS]
            symmetric = tasks[t, SYMMETRIC] != 0
            cost = costs0[b] if g == 0 else (costs1[b] if g == 1 else costs2[b])
            banded = g == band_group
            bb = b if banded else 0
            r_end = _forward_task(cost, n, m, symmetric, band_center[bb], band_width[bb], penalty, banded, scale,
                                  store, poly32, weights, strips)  # fmt: skip
            values[t] = r_end * (gamma * LN2)
            if store:
                grad = grads0[b] if g == 0 else (grads1[b] if g == 1 else grads2[b])
                spans = spans0[b] if g == 0 else (spans1[b] if g == 1 else spans2[b])
                _backward_task(n, m, symmetric, weights, grad, strips, spans)
    _set_fp_mode(fp_mode)


def strip_shape(max_rows: int, max_cols: int) -> tuple[int, int, int]:
    """Shape of the strip workspace for tasks of at most `max_rows` × `max_cols` cells."""
    return (max(1, max_rows) + STRIP - 1) // STRIP, max(1, max_cols) + STRIP, STRIP


@njit(inline="always", **_OPTS)
def _sweep_backward(e_down, w_up, e_right, w_left, e_diag, w_diag, e_out, count):
    """One diagonal of the E-recursion: E(i,j) = E(i+1,j)·w↑ + E(i,j+1)·w← + E(i+1,j+1)·w↖ (multiply-adds)."""
    for t in range(count):
        e_out[t] = e_down[t] * w_up[t] + e_right[t] * w_left[t] + e_diag[t] * w_diag[t]


@njit(**_OPTS)
def _backward_task(n, m, symmetric, weights, grad, strips, spans):
    """E-recursion of one task from its weights; writes E = dR(n, m)/dC into grad (N, M), zero on padding, and each
    row's span of nonzero columns into spans (N, 2).

    Each diagonal only computes the rows its successors' nonzero rows can reach (E(i, j) is a combination of
    E(i + 1, j), E(i, j + 1), E(i + 1, j + 1)), trimmed to its own first and last nonzero row; the rest of the
    diagonal is exactly zero. Far from the alignment path E underflows to zero (at γ = 0.1 about 85–90 % of the
    cells of B=8, N=M=256 sequences), so the recursion and the un-skewing only visit the band that is left."""
    lo_d, cnt_d, off_d = _layout(n, m, symmetric)
    width = n + 2 * VL + 3
    ring = np.zeros((3, width), dtype=weights.dtype)  # E of diagonals d, d + 1, d + 2 (rows index)
    flat = ring.reshape(-1)
    zero = weights.dtype.type(0.0)
    # rows [sup_lo[d], sup_hi[d]] of diagonal d hold all its nonzero E (sup_lo > sup_hi: none)
    sup_lo = np.full(n + m + 3, n + 2, dtype=np.int64)
    sup_hi = np.zeros(n + m + 3, dtype=np.int64)
    ring[(n + m) % 3, n] = 1.0  # E(n, m) = 1
    sup_lo[n + m] = n
    sup_hi[n + m] = n
    strips[(n - 1) // STRIP, m + (n - 1) % STRIP, (n - 1) % STRIP] = 1.0
    for d in range(n + m - 1, 1, -1):
        first = lo_d[d]
        count = cnt_d[d]
        last = first + count - 1
        e_out = (d % 3) * width  # ring rows: E of diagonals d, d + 1, d + 2
        e_next = ((d + 1) % 3) * width
        e_next2 = ((d + 2) % 3) * width
        # row i reads row i + 1 and row i of diagonal d + 1 and row i + 1 of diagonal d + 2
        r_lo = max(first, min(sup_lo[d + 1], sup_lo[d + 2]) - 1)
        r_hi = min(last, max(sup_hi[d + 1], sup_hi[d + 2]))
        if r_lo <= r_hi:
            # weight slot of row q on diagonal d + 1: base1 + plane·p + q (slot 0 is row lo − 1); same for d + 2
            plane1 = _plane_size(cnt_d[d + 1])
            base1 = off_d[d + 1] + 1 - lo_d[d + 1]
            # diagonal n + m + 1 does not exist (E = 0 there): any written, finite weights of the block do
            base2 = off_d[d + 2] + 1 - lo_d[d + 2] if d + 2 <= n + m else 0
            lanes = _padded(r_hi - r_lo + 1)
            _sweep_backward(_ptr(ring, e_next + r_lo + 1), _ptr(weights, base1 + plane1 + r_lo + 1),
                            _ptr(ring, e_next + r_lo), _ptr(weights, base1 + 2 * plane1 + r_lo),
                            _ptr(ring, e_next2 + r_lo + 1), _ptr(weights, base2 + r_lo + 1),
                            _ptr(ring, e_out + r_lo), lanes)  # fmt: skip
            while r_lo <= r_hi and flat[e_out + r_lo] == zero:
                r_lo += 1
            while r_hi >= r_lo and flat[e_out + r_hi] == zero:
                r_hi -= 1
        # rows first − 1 … last + 1 outside [r_lo, r_hi] are zero: the E = 0 boundary, rows no successor reaches,
        # the padded lanes' values past r_hi, and the slots the ring row kept from diagonal d + 3
        e_row = _ptr(ring, e_out)  # raw pointer: the stores vectorise (no negative-index check)
        for q in range(first - 1, min(r_lo, last + 2)):
            e_row[q] = zero
        for q in range(max(r_hi + 1, first - 1), last + 2):
            e_row[q] = zero
        if r_lo <= r_hi:
            sup_lo[d] = r_lo
            sup_hi[d] = r_hi
        if symmetric and d % 2 == 1:  # the mirrored cell (last + 1, last) = (last, last + 1), read by diagonal d − 1
            flat[e_out + last + 1] = flat[e_out + last]
            if flat[e_out + last + 1] != zero:
                sup_lo[d] = min(sup_lo[d], last + 1)
                sup_hi[d] = last + 1
        _diagonal_to_strips(flat, e_out, d, first, last, strips)
    first_d = np.empty(n + 1, dtype=np.int64)
    last_d = np.empty(n + 1, dtype=np.int64)
    low_first = np.empty(m + 1, dtype=np.int64)
    low_last = np.empty(m + 1, dtype=np.int64)
    _row_support(n, m, symmetric, lo_d, cnt_d, sup_lo, sup_hi, first_d, last_d, low_first, low_last)
    _strips_to_grad(strips, n, m, symmetric, grad, spans, first_d, last_d, low_first, low_last)

@njit(inline="always", **_OPTS)
def _axpy(scale, x, y, count):
    """y[k] += scale·x[k] for k < count (raw pointers)."""
    for k in range(count):
        y[k] += scale * x[k]


@njit(inline="always", **_OPTS)
def _span_products(e, spans, row, u, coefficient, acc, dim):
    """acc += coefficient·Σ_j E[row, j]·u[j] over the row's span of nonzero columns (e and u: one sample's arrays)."""
    cols = e.shape[1]
    e_row = _ptr(e, row * cols)
    for j in range(spans[row, 0], spans[row, 1]):
        _axpy(e_row[j] * coefficient, _ptr(u, j * dim), acc, dim)


@njit(nogil=True, **_OPTS)
def alignment_products(counter, e_xy, s_xy, e_xx, s_xx, e_yy, s_yy, ux, uy, c_xy, c_xx, c_yy, gx, gy):
    """The divergence's gradient w.r.t. its unit vectors from the expected alignments, samples pulled from `counter`:

        gx[b] = c_xy[b]·E_xy[b]·uy[b] + c_xx[b]·E_xx[b]·ux[b],   gy[b] = c_xy[b]·E_xy[b]ᵀ·ux[b] + c_yy[b]·E_yy[b]·uy[b]

    with E (B, N, M) / (B, N, N) / (B, M, M) and the unit vectors ux (B, N, D), uy (B, M, D), all C-contiguous.
    Only each row's span of nonzero columns `s_*` (B, rows, 2) is visited (see `_strips_to_grad`): at a small γ E
    is zero far from the alignment path, and the products cost in proportion to its nonzero band instead of N·M·D.
    E_xx and E_yy must be symmetric (a self term's E is), so a row's products stand for its column's.
    """
    fp_mode = _get_fp_mode()
    _set_fp_mode(np.uint32(fp_mode | _FTZ_DAZ))  # E·u products of far-off cells would be subnormal (see above)
    dim = ux.shape[2]
    acc_buffer = np.zeros(dim + VL, dtype=ux.dtype)
    acc = _ptr(acc_buffer, 0)
    zero = ux.dtype.type(0.0)
    while True:
        b = _fetch_add(counter, 0)
        if b >= e_xy.shape[0]:
            break
        ux_b, uy_b, gy_b = ux[b], uy[b], gy[b]
        e_xx_b, s_xx_b, e_yy_b, s_yy_b = e_xx[b], s_xx[b], e_yy[b], s_yy[b]
        gy_b[:] = zero
        for i in range(ux.shape[1]):
            acc_buffer[:] = zero
            # cross term: row i of E_xy feeds gx[i] (gather) and, transposed, the gy rows of its span (scatter)
            e_row = _ptr(e_xy, (b * e_xy.shape[1] + i) * e_xy.shape[2])
            u_i = _ptr(ux_b, i * dim)
            for j in range(s_xy[b, i, 0], s_xy[b, i, 1]):
                scale = e_row[j] * c_xy[b]
                _axpy(scale, _ptr(uy_b, j * dim), acc, dim)
                _axpy(scale, u_i, _ptr(gy_b, j * dim), dim)
            _span_products(e_xx_b, s_xx_b, i, ux_b, c_xx[b], acc, dim)
            out = _ptr(gx, (b * ux.shape[1] + i) * dim)
            for k in range(dim):
                out[k] = acc[k]
        for i in range(uy.shape[1]):
            acc_buffer[:] = zero
            _span_products(e_yy_b, s_yy_b, i, uy_b, c_yy[b], acc, dim)
            _axpy(ux.dtype.type(1.0), acc, _ptr(gy_b, i * dim), dim)
    _set_fp_mode(fp_mode)
