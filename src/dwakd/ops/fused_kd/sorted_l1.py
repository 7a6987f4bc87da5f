"""ULD's sorted-probability L1 distance, on logits chunk by chunk or fused with the LM heads.

Per row pair (z_s, z_t): ‖sort↓(softmax z_s) − sort↓(softmax z_t)‖₁, the shorter sorted vector zero-padded to the
longer vocabulary (the closed form of the Wasserstein-1 distance ULD uses). The distance is differentiable w.r.t.
the student logits only (the teacher is a fixed target); its gradient is known as soon as both rows are sorted:
d/dp_s = sign(s_(k) − t_(k)) at the rank k of each entry (+1 on a student tail that meets the teacher's zero
padding), scattered back through the sort, then through the softmax, p ⊙ (g − ⟨p, g⟩).

- `sorted_l1_rows` is that math on a block of logits (values and, when asked, the logit gradient), shared by the
  dense path of `dwakd.methods.uld` and the fused op below.
- `fused_head_sorted_l1` forms the logits from hidden states and head weights, `chunk_elements` logits per side at
  a time, and returns the *sum* of the distances over the rows. Because the output is one scalar, the gradients
  w.r.t. the student hidden rows and the student head are formed in forward chunk by chunk (as Liger-Kernel's
  fused linear losses do) and scaled by the incoming gradient in backward: no (rows × V) tensor for all rows, no
  sort of the whole batch at once and no second pass over the heads. Alive at a time: one chunk's probabilities
  of each side (the softmaxes are taken in the logits' storage, and the teacher's is freed once sorted), their
  sorted copies and the student side's sort order, plus the (rows, d_s) and (V_s, d_s) gradients.
  The teacher side may come as hidden states + head or as logits already formed (a teacher cache).

The plain reference is `dwakd.ops.fused_kd.reference.sorted_l1_reference` (torch.sort and autograd).
On CPU the sorts run in NumPy, several times faster than torch.sort on 50k–150k-wide rows; CUDA tensors use
torch.sort.
"""

from __future__ import annotations

import numpy as np
import torch

from dwakd.ops.autocast import matmul_dtype
from dwakd.ops.fused_kd.functional import _head_rows, _logits, _no_autocast, _row_blocks, add_chunk_grads_

# logits per side per chunk: 128 MiB in fp32, as `fused_head_kd` (a CPU GEMM over fewer rows is slower per row:
# the 151,646-row teacher head over 1,024 rows took 13 s in chunks of 110 rows, 10.7 s of 221, 8.2 s at once)
CHUNK_ELEMENTS = 1 << 25
NUMPY_SORT_ON_CPU = True  # sort CPU tensors with NumPy (the torch path is what CUDA tensors use)


def ascending(p: torch.Tensor, with_order: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of p (rows, V) sorted in increasing order, and the permutation when asked.

    Increasing, not decreasing: NumPy sorts that way, and a decreasing copy would cost a negated (argsort) or
    reversed-and-copied (sort) (rows, V) array more; the distance reads both sides aligned at their ends instead.
    """
    if p.device.type != "cpu" or not NUMPY_SORT_ON_CPU:
        values, order = p.sort(-1)
        return values, (order if with_order else None)
    array = p.detach().numpy()
    if with_order:
        order = np.argsort(array, axis=-1)
        return torch.from_numpy(np.take_along_axis(array, order, axis=-1)), torch.from_numpy(order)
    return torch.from_numpy(np.sort(array, axis=-1)), None


def _softmax_(z: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim in z's own storage: exp(z − max) / Σ."""
    z.sub_(z.amax(-1, keepdim=True)).exp_()
    return z.div_(z.sum(-1, keepdim=True))


def sorted_l1_rows(z_s: torch.Tensor, z_t: torch.Tensor, want_grad: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row sorted-probability L1 of student logits z_s (rows, V_s) against teacher logits z_t (rows, V_t), both
    already cut to their real vocabularies and in the compute dtype, and the gradient w.r.t. z_s when asked.

    Both inputs are consumed: their softmaxes are formed in their storage (the gradient is returned in z_s's), so
    pass tensors nothing else reads and hold no other reference to them (the teacher's is freed once sorted).

    Sorted increasingly, rank r of the decreasing order is position V − 1 − r, so the paired ranks r < k =
    min(V_s, V_t) are the last k entries of each row, and the longer side's tail (paired with zero padding) its
    first V − k entries.
    """
    p_s, p_t = _softmax_(z_s), _softmax_(z_t)
    del z_s, z_t
    t_sorted, _ = ascending(p_t, with_order=False)
    del p_t
    s_sorted, order = ascending(p_s, with_order=want_grad)
    v_s, v_t = s_sorted.shape[1], t_sorted.shape[1]
    k = min(v_s, v_t)
    diff = s_sorted[:, v_s - k:] - t_sorted[:, v_t - k:]
    values = diff.abs().sum(-1) + s_sorted[:, : v_s - k].sum(-1) + t_sorted[:, : v_t - k].sum(-1)
    if not want_grad:
        return values, None
    del t_sorted
    g_sorted = torch.ones_like(s_sorted)  # a student tail beyond V_t meets zero padding: +1
    g_sorted[:, v_s - k:] = torch.sign(diff)
    del diff, s_sorted
    g_p = torch.empty_like(g_sorted).scatter_(1, order.to(g_sorted.device), g_sorted)  # back to vocabulary order
    del g_sorted, order
    return values, p_s.mul_(g_p.sub_((p_s * g_p).sum(-1, keepdim=True)))  # through the softmax, in place


class _FusedHeadSortedL1(torch.autograd.Function):
    """Σ_rows sorted-probability L1 of h_s·W_sᵀ against the teacher's logits; gradients formed in forward."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, t_logits, s_vocab, t_vocab, chunk):  # type: ignore[override]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        s_mm = matmul_dtype(s_weight)
        t_mm = matmul_dtype(t_weight) if t_weight is not None else t_logits.dtype
        compute = torch.promote_types(torch.promote_types(s_mm, t_mm), torch.float32)
        grad_h = torch.zeros_like(s_hidden) if want_h else None
        grad_w = torch.zeros_like(s_weight) if want_w else None  # the full head: padding rows stay 0
        total = torch.zeros((), dtype=compute, device=s_hidden.device)
        with _no_autocast(s_hidden), torch.no_grad():
            head_s = _head_rows(s_weight, s_vocab, s_mm)
            head_t = None if t_weight is None else _head_rows(t_weight, t_vocab, t_mm)
            for rows in _row_blocks(s_hidden.shape[0], chunk):
                # (rows, V_s) and (rows, V_t) logits, handed over without a reference here: consumed in place
                values, g = sorted_l1_rows(
                    _logits(s_hidden[rows], head_s, compute),
                    _logits(t_hidden[rows], head_t, compute) if head_t is not None
                    else t_logits[rows, :t_vocab].to(compute, copy=True), want_h or want_w)
                total += values.sum()
                if g is None:
                    continue
                g_mm = g.to(head_s.dtype)
                del g
                add_chunk_grads_(g_mm, head_s, s_hidden, rows, grad_h, grad_w)
                del g_mm
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out.detach()
        return (None if grad_h is None else grad_h * scale.to(grad_h.dtype),
                None if grad_w is None else grad_w * scale.to(grad_w.dtype), None, None, None, None, None, None)


def fused_head_sorted_l1(
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    s_vocab: int,
    t_vocab: int,
    t_hidden: torch.Tensor | None = None,
    t_weight: torch.Tensor | None = None,
    t_logits: torch.Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Σ_i ‖sort↓ softmax(h_s,i·W_sᵀ) − sort↓ softmax(z_t,i)‖₁ over row pairs, differentiable w.r.t. `s_hidden` and
    `s_weight`.

    s_hidden (rows, d_s), s_weight (H_s ≥ s_vocab, d_s); the teacher rows either as t_hidden (rows, d_t) with
    t_weight (H_t ≥ t_vocab, d_t), z_t = h_t·W_tᵀ, or as t_logits (rows, ≥ t_vocab). Only the first s_vocab / t_vocab
    head rows (logit columns) enter. The teacher gets no gradient (pass it detached). Matmuls run as `F.linear` would
    (autocast's dtype when on); the softmaxes, sorts and distances in fp32 (float64 stays float64).
    """
    rows = s_hidden.shape[0] if s_hidden.dim() == 2 else -1
    if s_hidden.dim() != 2 or s_weight.dim() != 2 or s_weight.shape[1] != s_hidden.shape[1]:
        raise ValueError(f"s_hidden must be (rows, d) and s_weight (head rows, d), got {tuple(s_hidden.shape)} and "
                         f"{tuple(s_weight.shape)}")
    if not 1 <= s_vocab <= s_weight.shape[0]:
        raise ValueError(f"s_vocab must be in [1, {s_weight.shape[0]}] (the head's rows), got {s_vocab}")
    if (t_hidden is None) == (t_logits is None) or (t_hidden is None) != (t_weight is None):
        raise ValueError("give the teacher rows as t_hidden with t_weight, or as t_logits")
    if t_hidden is not None:
        if t_hidden.dim() != 2 or t_hidden.shape[0] != rows or t_weight.dim() != 2 \
                or t_weight.shape[1] != t_hidden.shape[1] or not 1 <= t_vocab <= t_weight.shape[0]:
            raise ValueError(f"t_hidden must be ({rows}, d_t) and t_weight (≥ {t_vocab}, d_t), got "
                             f"{tuple(t_hidden.shape)} and {tuple(t_weight.shape)}")
        teacher = (t_hidden, t_weight)
    else:
        if t_logits.dim() != 2 or t_logits.shape[0] != rows or not 1 <= t_vocab <= t_logits.shape[1]:
            raise ValueError(f"t_logits must be ({rows}, ≥ {t_vocab}), got {tuple(t_logits.shape)}")
        teacher = (t_logits,)
    if torch.is_grad_enabled() and any(t.requires_grad for t in teacher):
        raise ValueError("the teacher is a fixed target here: pass its tensors detached")
    chunk = max(1, chunk_elements // max(s_vocab, t_vocab))
    return _FusedHeadSortedL1.apply(s_hidden, s_weight, t_hidden, t_weight, t_logits, int(s_vocab), int(t_vocab),
                                    chunk)
