"""Triton kernel of `dwakd.ops.row_stats` on CUDA: per-row entropy and peak probability in one read of the row.

The plain PyTorch path (`row_entropy_peak_reference`) forms log-probabilities, their exponentials and a row dot
product chunk by chunk: five passes over each chunk and about ten kernel launches per chunk of a few rows (the fused
head op calls it per block of ~13 rows at V = 151,646). Here one program per row reads the row once, block by block,
keeping an online maximum m, Z = Σ e^(z − m) and W = Σ e^(z − m)·(z − m) (both rescaled when m grows), and writes

    H = ln Z − W / Z,   peak = 1 / Z,

in float32 whatever the input dtype (bf16, fp16, fp32). Entries of −inf count as probability 0; a row with a NaN,
a +inf or only −inf entries gives NaN, as the reference does. Tested against the reference in float64 under
Triton's CPU interpreter (`tests/test_row_stats_triton.py`) and on CUDA when one is present.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048  # entries per step of the row loop


@triton.jit(do_not_specialize=["row_stride", "vocab"])
def _row_stats_kernel(z_ptr, rows_ptr, row_stride, vocab, entropy_ptr, peak_ptr,
                      HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    k = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + k).to(tl.int64)
    else:
        row = k.to(tl.int64)
    base = z_ptr + row * row_stride
    neg_inf = float("-inf")
    m = tl.full((), neg_inf, tl.float32)
    total = tl.zeros((), tl.float32)
    weighted = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < vocab, other=neg_inf).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        shift = tl.where(m_new == neg_inf, 0.0, m_new)  # nothing finite yet: keep the sums at 0, not NaN
        alpha = tl.exp(m - shift)  # 0 while m is −inf
        # rescale Σ e·(z − m) to the new maximum; 0·(−inf) would be NaN while nothing was summed
        weighted = tl.where(total > 0, alpha * (weighted + total * (m - shift)), 0.0)
        e = tl.exp(x - shift)
        weighted += tl.sum(tl.where(e > 0, e * (x - shift), 0.0), 0)
        total = total * alpha + tl.sum(e, 0)
        m = m_new
    ok = total > 0  # False for NaN sums and rows of only −inf
    nan = float("nan")
    tl.store(entropy_ptr + k, tl.where(ok, tl.log(total) - weighted / total, nan))
    tl.store(peak_ptr + k, tl.where(ok, 1.0 / total, nan))


def row_entropy_peak_triton(
    flat: torch.Tensor, rows: torch.Tensor | None, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy in nats, peak probability), float32 (K,) each, of softmax over the first `vocab` columns of the
    selected rows of a 2-D tensor whose last axis is contiguous; one kernel launch."""
    count = flat.shape[0] if rows is None else rows.numel()
    entropy = torch.empty(count, dtype=torch.float32, device=flat.device)
    peak = torch.empty(count, dtype=torch.float32, device=flat.device)
    if count == 0:
        return entropy, peak
    index = entropy if rows is None else rows.to(device=flat.device, dtype=torch.int64)  # unused without rows
    _row_stats_kernel[(count,)](flat, index, flat.stride(0), vocab, entropy, peak, HAS_ROWS=rows is not None,
                                BLOCK=_BLOCK, num_warps=8)
    return entropy, peak
