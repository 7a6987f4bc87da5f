"""Cross-entropy per row of (rows, V) logits against labels, and the rows' argmax, without a (rows, V) temporary.

Every method's dense path takes the CE of the student's logits at the label rows (and DSKD its t2s logits' CE and
argmax, the correctness mask). `F.cross_entropy` forms the (rows, V) log-softmax in forward and keeps it, and in
backward a zero-filled (rows, V) NLL gradient, the label entries scattered in, then the log-softmax backward over
both: at 50,257 columns about a sixth of a `dskd` step on a CPU. The CPU fast path here is one numba pass per row
for the value (the row maximum, its first index, then Z = Σ 2^((z − m)·log2 e)) and one pass for the gradient,
written straight into the gradient tensor:

    CE = m + ln 2 · log2 Z − z_label,    ∂CE/∂z_v = 2^((z_v − m)·log2 e − log2 Z) − [v = label].

Sums are float32 with reassociation allowed (vector partial sums); 2^x and log2 are the polynomials of
`ops/_numba_math.py` (2^x counts arguments below −125 as −125: a probability below 2^−125 of the row's largest).
A row with a non-finite entry (±inf, NaN) is computed by the plain path instead, which the −inf clamping and NaN
propagation of `F.cross_entropy` need. Rows are split over up to `torch.get_num_threads()` threads
(`ops._threads`).

`label_ce_rows` takes the fast path for float32 CPU logits whose last axis is contiguous; otherwise (CUDA, 16-bit,
float64) it is the plain PyTorch reference `label_ce_rows_reference`, which the tests compare against.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

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
        log2e = np.float32(math.log2(math.e))
        opts = dict(nogil=True, cache=True, error_model="numpy", fastmath={"contract", "reassoc"})

        @njit(**opts)
        def forward(z, labels, vocab, start, end, ce, argmax, m_out, log2_z, bad):  # pragma: no cover - compiled
            for k in range(start, end):
                row = z[k]
                m = row_max(row, vocab)
                if not (m > neg_inf and m < inf):
                    bad[k] = 1
                    continue
                total = zero
                nonfinite = zero  # a float32 count keeps the loop at the full float32 vector width
                for v in range(vocab):
                    x = row[v]
                    nonfinite += zero if abs(x) < inf else one
                    total += _exp2_nonpos_f32((x - m) * log2e)
                if nonfinite:
                    bad[k] = 1
                    continue
                lz = _log2_pos_f32(total)
                ce[k] = m + ln2 * lz - row[labels[k]]
                m_out[k] = m
                log2_z[k] = lz
                for v in range(vocab):  # the first maximal entry, as torch.argmax
                    if row[v] == m:
                        argmax[k] = v
                        break

        @njit(**opts)
        def backward(z, labels, vocab, start, end, grad_out, m_in, log2_z, grad):  # pragma: no cover - compiled
            for k in range(start, end):
                row = z[k]
                out = grad[k]
                c = grad_out[k]
                m, lz = m_in[k], log2_z[k]
                for v in range(vocab):
                    out[v] = c * _exp2_nonpos_f32((row[v] - m) * log2e - lz)
                out[labels[k]] -= c

        _KERNELS = (forward, backward)
    return _KERNELS


def fast_path_applies(logits: torch.Tensor) -> bool:
    """Whether `label_ce_rows` runs the numba kernels: float32 (rows, V) CPU logits, last axis contiguous."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.stride(-1) == 1)


def label_ce_rows_reference(logits: torch.Tensor, labels: torch.Tensor, with_argmax: bool = True
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain PyTorch: (−log softmax(z)[label] per row in fp32 (float64 stays), argmax per row or None)."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(z, labels, reduction="none"), logits.detach().argmax(-1) if with_argmax else None


class _LabelCE(torch.autograd.Function):
    """The fast path; rows with a non-finite entry go through the reference in forward and backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor):  # noqa: D102
        rows, vocab = logits.shape
        ce = torch.zeros(rows, dtype=torch.float32)
        argmax = torch.zeros(rows, dtype=torch.int64)
        m, log2_z = torch.zeros(rows, dtype=torch.float32), torch.zeros(rows, dtype=torch.float32)
        bad = torch.zeros(rows, dtype=torch.uint8)
        label_array = labels.detach().to(torch.int64).contiguous().numpy()
        forward, _ = _kernels()
        run_over_rows(lambda start, end: forward(logits.detach().numpy(), label_array, vocab, start, end,
                                                 ce.numpy(), argmax.numpy(), m.numpy(), log2_z.numpy(),
                                                 bad.numpy()), rows, vocab)
        bad_rows = bad.bool().nonzero().squeeze(1)
        if bad_rows.numel():
            with torch.no_grad():
                ce_bad, arg_bad = label_ce_rows_reference(logits.index_select(0, bad_rows),
                                                          labels.index_select(0, bad_rows))
            ce[bad_rows], argmax[bad_rows] = ce_bad, arg_bad
        ctx.save_for_backward(logits, labels, m, log2_z, bad_rows)
        ctx.mark_non_differentiable(argmax)
        return ce, argmax

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, _grad_argmax: torch.Tensor):  # noqa: D102
        logits, labels, m, log2_z, bad_rows = ctx.saved_tensors
        rows, vocab = logits.shape
        grad = torch.empty(rows, vocab, dtype=torch.float32)
        g = grad_ce.detach().to(torch.float32).contiguous()
        label_array = labels.detach().to(torch.int64).contiguous().numpy()
        _, backward = _kernels()
        run_over_rows(lambda start, end: backward(logits.detach().numpy(), label_array, vocab, start, end, g.numpy(),
                                                  m.numpy(), log2_z.numpy(), grad.numpy()), rows, vocab)
        if bad_rows.numel():  # the reference's gradient, NaN and −inf handling included
            z = logits.detach().index_select(0, bad_rows).requires_grad_(True)
            with torch.enable_grad():
                ce_bad, _ = label_ce_rows_reference(z, labels.index_select(0, bad_rows))
            (grad_bad,) = torch.autograd.grad(ce_bad, z, g.index_select(0, bad_rows))
            grad[bad_rows] = grad_bad
        return grad, None


def label_ce_rows(logits: torch.Tensor, labels: torch.Tensor, with_argmax: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(CE (rows,) in fp32 (float64 logits: float64), argmax (rows,) int64 if `with_argmax` else None) of (rows, V)
    logits against `labels` (rows,) in [0, V); differentiable in `logits`. The numba path where
    `fast_path_applies` (its argmax comes from the value pass), else the reference."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"label_ce_rows: logits must be (rows, V) and labels (rows,); got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    if not fast_path_applies(logits) or logits.shape[0] == 0:
        return label_ce_rows_reference(logits, labels, with_argmax)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= logits.shape[1]:
        raise ValueError(f"label_ce_rows: labels must lie in [0, {logits.shape[1]}); got values in [{low}, {high}]")
    ce, argmax = _LabelCE.apply(logits, labels)
    return ce, argmax if with_argmax else None
