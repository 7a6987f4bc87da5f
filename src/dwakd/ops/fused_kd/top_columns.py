"""MultiLevelOT's top-k probability columns, fused with the LM head: no (rows × V) tensor for all rows.

Per row, p = softmax(z / (std_v(z) + 1e-4) / T) over the real vocabulary (std with Bessel's correction, as
`torch.std`); the columns are ranked by their probability summed over all rows (one order for the batch) and the
top k kept, in that order: p̂ (rows, k). `dwakd.methods.multilevel_ot` does this on dense logits
(`std_normalised_probs`, `top_columns`).

`fused_head_top_columns` forms the logits h·Wᵀ a chunk of rows at a time:
- forward: one pass over the head accumulates the column sums (nothing per row is kept), then the k winning
  columns' logits are one small product h·W[cols]ᵀ, normalised with each row's std and log-sum-exp from the pass;
- backward: recomputes each chunk's logits and forms the dense gradient from the k-column upstream gradient G:
  dL/du = p ⊙ (Ĝ − ⟨G, p̂⟩) (Ĝ: G scattered to its columns), through u = z / (σ·T), σ = std(z) + 1e-4, to
  dL/dz = dL/du / (σT) − (Σ_v dL/du_v·z_v / (σ²T))·(z − mean(z)) / ((V − 1)·std(z)), then one matmul per chunk
  into the hidden rows' gradient and, in place, the head's.
Alive at a time: one chunk's logits and a few same-sized temporaries; the output and its gradient are (rows, k).
The plain reference is `multilevel_ot.std_normalised_probs` + `top_columns` on `F.linear` logits (autograd).
"""

from __future__ import annotations

import torch

from dwakd.ops.autocast import matmul_dtype
from dwakd.ops.fused_kd.functional import _head_rows, _logits, _no_autocast, _row_blocks, add_chunk_grads_

CHUNK_ELEMENTS = 1 << 25  # logits per chunk: 128 MiB in fp32, as `fused_head_kd` (see `sorted_l1.CHUNK_ELEMENTS`)
STD_EPS = 1e-4  # added to the std (MultiLevelOT's reference code)


def _normalised(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(u = z / (std(z) + eps) / T, std(z)) per row of a (rows, V) chunk, in the dense path's order of operations;
    std unbiased (`torch.std`'s default)."""
    std = z.std(dim=-1, keepdim=True)
    return z.div(std + STD_EPS).div_(temperature), std


class _FusedHeadTopColumns(torch.autograd.Function):
    """p̂ (rows, k) of h·Wᵀ: column sums and per-row std / log-sum-exp in one chunked forward pass; backward
    recomputes each chunk's logits (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, vocab, temperature, k, chunk):  # type: ignore[override]
        mm = matmul_dtype(weight)
        compute = torch.promote_types(mm, torch.float32)
        rows = hidden.shape[0]
        with _no_autocast(hidden), torch.no_grad():
            head = _head_rows(weight, vocab, mm)
            column_sums = torch.zeros(vocab, dtype=compute, device=hidden.device)
            sigma = torch.empty(rows, 1, dtype=compute, device=hidden.device)  # std + eps
            lse = torch.empty(rows, 1, dtype=compute, device=hidden.device)
            for part in _row_blocks(rows, chunk):
                u, std = _normalised(_logits(hidden[part], head, compute), temperature)
                sigma[part] = std + STD_EPS
                lse[part] = torch.logsumexp(u, -1, keepdim=True)
                column_sums += u.sub_(lse[part]).exp_().sum(0)
                del u
            cols = torch.argsort(column_sums, descending=True)[: min(k, vocab)]
            z_cols = _logits(hidden, head.index_select(0, cols), compute)  # (rows, k)
            out = z_cols.div_(sigma).div_(temperature).sub_(lse).exp_()
        ctx.save_for_backward(hidden, weight, cols)
        ctx.vocab, ctx.temperature, ctx.chunk = vocab, temperature, chunk
        ctx.mm = mm  # the matmul dtype: backward may run outside the forward's autocast
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, cols = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None  # the full head: padding rows stay 0
        if grad_out is None or not (want_h or want_w):
            return grad_h, grad_w, None, None, None, None
        vocab, temperature, mm = ctx.vocab, ctx.temperature, ctx.mm  # recompute as the forward did
        compute = torch.promote_types(mm, torch.float32)
        with _no_autocast(hidden), torch.no_grad():
            head = _head_rows(weight, vocab, mm)
            for part in _row_blocks(hidden.shape[0], ctx.chunk):
                z = _logits(hidden[part], head, compute)  # (rows, V)
                u, std = _normalised(z, temperature)
                p = u.sub_(torch.logsumexp(u, -1, keepdim=True)).exp_()  # softmax, in u's storage
                g = grad_out[part].to(compute)  # (rows, k)
                p_hat = p.index_select(1, cols)  # (rows, k)
                inner = (g * p_hat).sum(-1, keepdim=True)  # ⟨G, p̂⟩
                d_u = p.mul_(-inner).index_add_(1, cols, g * p_hat)  # p ⊙ (Ĝ − ⟨G, p̂⟩), in p's storage
                del p_hat
                sigma_t = (std + STD_EPS) * temperature
                d_sigma = -(d_u * z).sum(-1, keepdim=True) / (sigma_t * (std + STD_EPS))  # dL/dσ
                centred = z.sub_(z.mean(-1, keepdim=True))
                d_z = d_u.div_(sigma_t).add_(centred.mul_(d_sigma / ((vocab - 1) * std)))
                del z, centred
                g_mm = d_z.to(head.dtype)
                del d_z
                add_chunk_grads_(g_mm, head, hidden, part, grad_h, grad_w)
                del g_mm
        return grad_h, grad_w, None, None, None, None


def fused_head_top_columns(hidden: torch.Tensor, weight: torch.Tensor, vocab: int, temperature: float, k: int,
                           chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """(rows, min(k, vocab)) MultiLevelOT probabilities of h·Wᵀ at the k columns with the largest sums over the rows,
    in decreasing order of those sums; differentiable w.r.t. `hidden` and `weight` (only its first `vocab` rows
    enter). The matmul runs as `F.linear` would (autocast's dtype when on), the rest in fp32 (float64 stays)."""
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden must be (rows, d) and weight (head rows, d), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if not 2 <= vocab <= weight.shape[0]:
        raise ValueError(f"vocab must be in [2, {weight.shape[0]}] (the head's rows), got {vocab}")
    if not temperature > 0 or k < 1:
        raise ValueError(f"temperature must be > 0 and k ≥ 1, got {temperature} and {k}")
    return _FusedHeadTopColumns.apply(hidden, weight, int(vocab), float(temperature), int(k),
                                      max(1, chunk_elements // vocab))
