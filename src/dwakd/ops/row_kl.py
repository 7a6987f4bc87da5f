"""Forward KL per row between two softmaxes over a vocabulary, and its gradient, without a (rows, V) temporary.

The dense path of the dual-space methods' KD terms takes KL(softmax(t/τ) ‖ softmax(s/τ)) of every response row
over vocabularies of 50k-152k entries (`dwakd.modules.divergences.divergence`, kind fkl: the teacher-space term of
DSKD and DWA-KD always, the student-space one by default). In plain PyTorch that is two log-softmaxes, an exp, a
difference and a row dot product per chunk of rows, with three (rows, V) temporaries, and as much again in
backward; on CPU those fresh temporaries also page-fault in every time. The CPU fast path here is two numba
passes per row for the value (the maxima, then every sum at once) and one pass for the gradient, straight into
the gradient tensor.

With a_v = (t_v − m_t)·log2(e)/τ and b_v = (s_v − m_s)·log2(e)/τ (both ≤ 0, m the row maxima),
    Z_t = Σ 2^a,  Z_s = Σ 2^b,  W = Σ 2^a·(a − b),   KL = ln 2 · (W / Z_t − log2 Z_t + log2 Z_s),
and the gradient w.r.t. s/τ is q − p = 2^(b − log2 Z_s) − 2^(a − log2 Z_t) (scaled by dL/dKL / τ in the kernel).
Sums are float32 with reassociation allowed (vector partial sums); 2^x and log2 are the polynomials of
`ops/_numba_math.py`, whose 2^x counts arguments below −125 as −125 (a probability below 2^−125 of the row's
largest).
A row with a non-finite entry (±inf, NaN) on either side is flagged and left to the plain path, whose −inf
clamping and NaN propagation it needs. Rows are split over up to `torch.get_num_threads()` threads (`ops._threads`:
torch's own OpenMP team where torch uses libgomp).

On request the same summing pass also gives either side's τ = 1 entropy and peak probability (DWA-KD's token
weights and gate read them from the very logits of the KD terms): with a¹ = (z − m)·log2(e), Z¹ = Σ 2^a¹ and
W¹ = Σ 2^a¹·a¹, H = ln 2 · (log2 Z¹ − W¹/Z¹) and peak = 1/Z¹ — one more 2^x per entry instead of a separate max
pass and exp pass over the row (`ops.row_stats`); at τ = 1 the KL's own 2^a, at τ = 2 its square (floored at 2^−124:
an entry below 2^−124 of the row's largest counts as that, as 2^x's floor does below 2^−125). The kernel is compiled
once per combination of sides asked for and of τ ∈ {1, 2, other}.

`fkl_rows_applies` says when the fast path is taken: float32 CPU tensors whose last axis is contiguous. The plain
PyTorch reference is `dwakd.modules.divergences` itself (`_value` / `_grad`), which the tests compare against.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dwakd.ops._threads import run_over_rows

_KERNELS = None


def _kernels():
    """(forward, backward) numba kernels, compiled on first use (or loaded from numba's on-disk cache)."""
    global _KERNELS
    if _KERNELS is None:
        from numba import njit

        from dwakd.ops._numba_math import _exp2_nonpos_f32, _log2_pos_f32
        from dwakd.ops._numba_math import _row_max_f32 as row_max

        zero, one = np.float32(0.0), np.float32(1.0)
        neg_inf, inf = np.float32(-np.inf), np.float32(np.inf)
        ln2 = np.float32(math.log(2.0))
        opts = dict(nogil=True, cache=True, error_model="numpy", fastmath={"contract", "reassoc"})

        log2e = np.float32(math.log2(math.e))
        two = np.float32(2.0)
        floor_half = np.float32(2.0**-62)  # squares stay normal floats (≥ 2^−124): no subnormal arithmetic

        @njit(inline="always", **opts)
        def _unit_temperature(x, m, a, e, power):  # pragma: no cover - compiled
            """(a¹, 2^a¹) with a¹ = (x − m)·log2(e), the τ = 1 exponent of an entry, given its τ one a and 2^a."""
            if power == 1:
                return a, e
            if power == 2:
                e_c = e if e > floor_half else floor_half  # a vector max, as in `_exp2_nonpos_f32`
                return a * two, e_c * e_c
            a1 = (x - m) * log2e
            return a1, _exp2_nonpos_f32(a1)

        def make_forward(stats_s: bool, stats_t: bool, power: int):
            """The value kernel; with `stats_s` / `stats_t` (compile-time constants) also that side's τ = 1
            entropy and peak. `power` τ when it is 1 or 2, the τ = 1 exponentials being then the τ ones or their
            squares (a multiply instead of a 2^x per entry and side); 0 for any other τ."""

            @njit(**opts)
            def forward(s, t, s_rows, t_rows, vocab, scale, start, end, value, m_s, m_t, log2_zs, log2_zt, bad,
                        stats):  # pragma: no cover - compiled
                for k in range(start, end):
                    s_row = s[s_rows[k]]
                    t_row = t[t_rows[k]]
                    ms = row_max(s_row, vocab)
                    mt = row_max(t_row, vocab)
                    if not (ms > neg_inf and ms < inf and mt > neg_inf and mt < inf):
                        bad[k] = 1
                        continue
                    zs = zero
                    zt = zero
                    w = zero
                    zs1 = zero
                    ws1 = zero
                    zt1 = zero
                    wt1 = zero
                    nonfinite = zero  # a float32 count keeps the loop at the full float32 vector width
                    for v in range(vocab):
                        x = s_row[v]
                        y = t_row[v]
                        nonfinite += zero if (abs(x) < inf and abs(y) < inf) else one
                        b = (x - ms) * scale
                        a = (y - mt) * scale
                        e_s = _exp2_nonpos_f32(b)
                        e_t = _exp2_nonpos_f32(a)
                        zs += e_s
                        zt += e_t
                        w += e_t * (a - b)
                        if stats_s:
                            b1, e1 = _unit_temperature(x, ms, b, e_s, power)
                            zs1 += e1
                            ws1 += e1 * b1
                        if stats_t:
                            a1, e1 = _unit_temperature(y, mt, a, e_t, power)
                            zt1 += e1
                            wt1 += e1 * a1
                    if nonfinite:
                        bad[k] = 1
                        continue
                    ls = _log2_pos_f32(zs)
                    lt = _log2_pos_f32(zt)
                    value[k] = ln2 * (w / zt - lt + ls)
                    m_s[k] = ms
                    m_t[k] = mt
                    log2_zs[k] = ls
                    log2_zt[k] = lt
                    if stats_s:
                        stats[0, k] = ln2 * (_log2_pos_f32(zs1) - ws1 / zs1)
                        stats[1, k] = one / zs1
                    if stats_t:
                        stats[2, k] = ln2 * (_log2_pos_f32(zt1) - wt1 / zt1)
                        stats[3, k] = one / zt1

            return forward

        forwards = {(ss, st, power): make_forward(ss, st, power)
                    for ss in (False, True) for st in (False, True) for power in (0, 1, 2)}

        @njit(**opts)
        def backward(s, t, s_rows, t_rows, vocab, scale, inv_tau, start, end, grad_out, m_s, m_t, log2_zs, log2_zt,
                     grad, g_rows):  # pragma: no cover - compiled
            for k in range(start, end):
                s_row = s[s_rows[k]]
                t_row = t[t_rows[k]]
                out = grad[g_rows[k]]
                c = grad_out[k] * inv_tau
                ms, mt, ls, lt = m_s[k], m_t[k], log2_zs[k], log2_zt[k]
                for v in range(vocab):
                    b = (s_row[v] - ms) * scale - ls
                    a = (t_row[v] - mt) * scale - lt
                    q = _exp2_nonpos_f32(b)
                    p = _exp2_nonpos_f32(a)
                    out[v] = c * (q - p)

        _KERNELS = (forwards, backward)
    return _KERNELS


def fkl_rows_applies(student: torch.Tensor, teacher: torch.Tensor) -> bool:
    """Whether `fkl_rows_forward` serves these (rows, V) logits: float32 CPU tensors, last axis contiguous."""
    return all(x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.stride(-1) == 1
               for x in (student, teacher))


def _run(kernel, count: int, vocab: int, head: tuple, tail: tuple) -> None:
    """kernel(*head, start, end, *tail) over `count` rows in up to torch.get_num_threads() threads."""
    run_over_rows(lambda start, end: kernel(*head, start, end, *tail), count, vocab)


def _indices(rows: torch.Tensor | None, total: int) -> np.ndarray:
    return np.arange(total, dtype=np.int64) if rows is None else rows.detach().to("cpu", torch.int64).numpy()


def fkl_rows_forward(
    student: torch.Tensor, teacher: torch.Tensor, student_rows: torch.Tensor | None,
    teacher_rows: torch.Tensor | None, temperature: float, student_stats: bool = False, teacher_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """Per selected row KL(softmax(t/τ) ‖ softmax(s/τ)) (K,) float32, a (K,) bool mask of the rows left undone
    (a non-finite entry: compute them on the plain path), the per-row values `fkl_rows_backward` needs, and a
    (4, K) float32 tensor of τ = 1 statistics: student entropy (nats) and peak, teacher entropy and peak (rows of a
    side not asked for, and rows left undone, are 0)."""
    total = student.shape[0] if student_rows is None else student_rows.numel()
    vocab = student.shape[1]
    s_idx, t_idx = _indices(student_rows, total), _indices(teacher_rows, total)
    value = torch.zeros(total, dtype=torch.float32)
    saved = tuple(torch.zeros(total, dtype=torch.float32) for _ in range(4))  # m_s, m_t, log2 Z_s, log2 Z_t
    stats = torch.zeros(4, total, dtype=torch.float32)
    bad = torch.zeros(total, dtype=torch.uint8)
    if total:
        forwards, _ = _kernels()
        scale = np.float32(math.log2(math.e) / temperature)
        power = int(temperature) if temperature in (1.0, 2.0) else 0
        _run(forwards[bool(student_stats), bool(teacher_stats), power], total, vocab,
             (student.detach().numpy(), teacher.detach().numpy(), s_idx, t_idx, vocab, scale),
             (value.numpy(), *(x.numpy() for x in saved), bad.numpy(), stats.numpy()))
    return value, bad.bool(), saved, stats


def fkl_rows_backward(
    student: torch.Tensor, teacher: torch.Tensor, student_rows: torch.Tensor | None,
    teacher_rows: torch.Tensor | None, temperature: float, grad_out: torch.Tensor, stats: tuple[torch.Tensor, ...],
    grad: torch.Tensor,
) -> None:
    """Write grad_out_k / τ · (q − p) of each selected row k into its row of `grad` (float32, the student's shape):
    the row `student_rows[k]` (row k without indices). `grad_out` (K,) is dL/dKL_k, read as it is when it is
    contiguous float32: no (K,) coefficient temporary next to the (rows, V) gradient (a weighted sum's per-row
    gradient is all a token-weighted loss adds there). Rows flagged by the forward must be overwritten by the
    caller."""
    total = grad_out.numel()
    if not total:
        return
    vocab = student.shape[1]
    s_idx, t_idx = _indices(student_rows, total), _indices(teacher_rows, total)
    _, backward = _kernels()
    scale = np.float32(math.log2(math.e) / temperature)
    inv_tau = np.float32(1.0 / temperature)
    _run(backward, total, vocab,
         (student.detach().numpy(), teacher.detach().numpy(), s_idx, t_idx, vocab, scale, inv_tau),
         (grad_out.detach().to(torch.float32).contiguous().numpy(), *(x.numpy() for x in stats), grad.numpy(),
          s_idx))
