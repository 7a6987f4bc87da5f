"""float32 math for numba kernels without libm calls, so that loops over them vectorise (AVX2: 8 lanes, AVX-512: 16).

`_exp2_nonpos_f32` (2^t for t ≤ 0, relative error ≤ 2.5e-7) and `_log2_pos_f32` (log2 s for a normal s > 0, absolute
error ≤ 2e-7 on [1, 3]): range reduction by integer bit operations plus a short polynomial, branch-free. Shared by the
Soft-DTW kernels (`ops/soft_dtw/_cpu_kernels.py`), the row statistics (`ops/row_stats.py`) and the row forward KL
(`ops/row_kl.py`), as is `_row_max_f32` (a row's maximum over 16 interleaved lanes).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# Only contraction of a·b + c into one fused multiply-add; no reassociation and no finite-math assumptions.
_OPTS = {"cache": True, "error_model": "numpy", "fastmath": {"contract"}}

_F = np.float32
# 2^f = 1 + f·P(f) on f ∈ [−½, ½] (near-minimax fit of the relative error: 9e-8; ≤ 2.5e-7 evaluated in float32).
_E1, _E2, _E3, _E4, _E5 = (_F(0.6931470036506653), _F(0.24022242426872253), _F(0.05550733953714371),
                           _F(0.00967151578515768), _F(0.001326472614891827))  # fmt: skip
# log2(1 + x) = x·Q(x) on x ∈ [−⅓, ⅓] (near-minimax fit of the absolute error: 4e-8; ≤ 2e-7 in float32).
_Q0, _Q1, _Q2, _Q3, _Q4, _Q5, _Q6, _Q7 = (_F(1.442694067955017), _F(-0.7213439345359802), _F(0.4810197353363037),
                                          _F(-0.3609277009963989), _F(0.28458765149116516), _F(-0.2346794307231903),
                                          _F(0.25202834606170654), _F(-0.23198306560516357))  # fmt: skip
_T_MIN = _F(-125.0)  # 2^t is clamped at 2^−125 (keeps every result a normal float32)
_TWO_THIRDS_BITS = np.int32(0x3F2AAAAB)  # bit pattern of float32(2/3): log2 splits s = 2^e·m with m ∈ [2/3, 4/3)
_ONE = _F(1.0)
_23 = np.int32(23)  # float32 mantissa bits


@intrinsic
def _i32_as_f32(typingctx, bits):  # noqa: ARG001
    """Reinterpret int32 bits as a float32 (a vectorisable bitcast)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_as_i32(typingctx, value):  # noqa: ARG001
    """Reinterpret float32 bits as an int32 (a vectorisable bitcast)."""
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


def _i32_binary(name: str, doc: str):
    """An int32 ⊕ int32 → int32 intrinsic (numba promotes int32 arithmetic to int64; 64-bit vector shifts do not
    exist on AVX2 and would be emulated with shuffles in the softmin loop)."""

    def impl(typingctx, a, b):  # noqa: ARG001
        sig = types.int32(types.int32, types.int32)

        def codegen(context, builder, signature, args):  # noqa: ARG001
            return getattr(builder, name)(args[0], args[1])

        return sig, codegen

    impl.__doc__ = doc
    return intrinsic(impl)


_i32_add = _i32_binary("add", "a + b in int32 (wrapping).")
_i32_sub = _i32_binary("sub", "a − b in int32 (wrapping).")
_i32_shl = _i32_binary("shl", "a << b in int32.")
_i32_sar = _i32_binary("ashr", "a >> b in int32 (arithmetic).")


@njit(inline="always", **_OPTS)
def _exp2_nonpos_f32(t):
    """2^t for float32 t ≤ 0 without libm: round-to-nearest split, degree-5 polynomial, exponent by integer add.

    t ≤ −125 (and NaN) give 2^−125·(1 ± ½): a weight of ~1e−38 for an unreachable (+inf) predecessor, whose E is
    never computed, and nothing measurable in s ≥ 1, so no mask is spent on an exact 0. Branch-free: `x if c else y`
    becomes a vector max; numba's builtin max() would not (it lowers to a switch that blocks vectorisation).
    """
    tc = t if t > _T_MIN else _T_MIN
    k = np.rint(tc)
    f = tc - k  # ∈ [−½, ½], exact
    f2 = f * f
    p = _ONE + f * ((_E1 + f * _E2) + f2 * ((_E3 + f * _E4) + f2 * _E5))  # Estrin: short dependency chain
    return _i32_as_f32(_i32_add(_f32_as_i32(p), _i32_shl(np.int32(k), _23)))  # p·2^k, k ∈ [−125, 0]: stays normal


@njit(inline="always", **_OPTS)
def _log2_pos_f32(s):
    """log2(s) for a normal float32 s > 0 without libm (used on s ∈ [1, 3]): s = 2^e·m, m ∈ [⅔, 4/3), polynomial."""
    bits = _f32_as_i32(s)
    e = _i32_sar(_i32_sub(bits, _TWO_THIRDS_BITS), _23)
    x = _i32_as_f32(_i32_sub(bits, _i32_shl(e, _23))) - _ONE  # m − 1 ∈ [−⅓, ⅓)
    x2 = x * x
    x4 = x2 * x2
    q = ((_Q0 + x * _Q1) + x2 * (_Q2 + x * _Q3)) + x4 * ((_Q4 + x * _Q5) + x2 * (_Q6 + x * _Q7))
    return _F(e) + x * q


_NEG_INF = _F(-np.inf)


@njit(inline="always", **_OPTS)
def _row_max_f32(row, vocab):
    """max of row[:vocab] (float32) over 16 interleaved lanes, so that the loop vectorises; NaN entries lose every
    comparison and are skipped (callers that must see them count them), −inf when every entry is −inf."""
    lanes = np.empty(16, dtype=np.float32)
    lanes[:] = _NEG_INF
    whole = vocab - vocab % 16
    for b in range(0, whole, 16):
        for lane in range(16):
            z = row[b + lane]
            lanes[lane] = z if z > lanes[lane] else lanes[lane]
    m = _NEG_INF
    for lane in range(16):
        m = lanes[lane] if lanes[lane] > m else m
    for v in range(whole, vocab):
        m = row[v] if row[v] > m else m
    return m
