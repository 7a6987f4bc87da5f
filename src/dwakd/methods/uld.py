"""ULD — Universal Logit Distillation (Boizard et al., arXiv 2402.12030), docs/methods.md#62-uld.

Per position, both distributions are taken without temperature, sorted in decreasing order, the smaller
vocabulary zero-padded, and compared with an L1 distance (the closed form of the Wasserstein-1 distance the
paper uses). Positions are paired index by index from the first response token of each side, for
min(n, m) positions per sequence. loss = (1 − kd_rate)·CE + kd_rate·Σ L1 / num_items.

Differences from the reference code (DSKD's `universal_logit_distillation.py`), listed in docs/methods.md#62-uld:
- the sum over positions is divided by the global student token count (docs/methods.md §2.1), like every term here;
- head rows beyond the tokenizer's vocabulary are dropped before the softmax (the reference keeps them);
- `kd_temperature` is not used (the reference has no temperature in ULD either).
Speed and memory: the gradient is formed during forward, chunk by chunk (`_SortedL1`), so sorted copies and
sort indices exist for one chunk at a time and only the (positions, V_s) gradient is kept for backward. On CPU
the sorts run in NumPy, several times faster than torch.sort on 50k–150k-wide rows.
"""

from __future__ import annotations

import numpy as np
import torch

from dwakd.methods.base import DistillationInputs, DistillationMethod, LossOutput, MethodOptions
from dwakd.methods.registry import register_method
from dwakd.modules.cross_entropy import label_cross_entropy_sum
from dwakd.modules.rows import paired_rows

CHUNK_ELEMENTS = 1 << 24  # (rows × vocab) elements per chunk
NUMPY_SORT_ON_CPU = True  # sort CPU tensors with NumPy (the torch path is what CUDA tensors use)


def _descending(p: torch.Tensor, with_order: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of p (rows, V) sorted in decreasing order, and the permutation when asked.

    On CPU, NumPy's sort is several times faster than torch.sort for 50k–150k-wide rows, so it is used there.
    """
    if p.device.type != "cpu" or not NUMPY_SORT_ON_CPU:
        values, order = p.sort(-1, descending=True)
        return values, (order if with_order else None)
    array = p.detach().numpy()
    if with_order:
        order = np.argsort(-array, axis=-1)
        return torch.from_numpy(np.take_along_axis(array, order, axis=-1)), torch.from_numpy(order)
    return torch.from_numpy(np.ascontiguousarray(np.sort(array, axis=-1)[:, ::-1])), None


class _SortedL1(torch.autograd.Function):
    """Per-row ‖sort↓(softmax z_s) − sort↓(softmax z_t)‖₁ (zero-padded); the gradient is formed in forward, by chunk.

    d/dp_s of the distance is sign(s_(k) − t_(k)) at the rank k of each entry (+1 on a student tail that meets
    the teacher's zero padding), scattered back through the sort, then through the softmax: p ⊙ (g − ⟨p, g⟩).
    Only that gradient, (pairs, V_s), is kept for backward; sorted copies and indices live for one chunk.
    """

    @staticmethod
    def forward(ctx, student, teacher, s_rows, t_rows, student_vocab, teacher_vocab, chunk):  # type: ignore[override]
        dtype = torch.promote_types(student.dtype, torch.float32)
        total = s_rows.numel()
        values = torch.empty(total, dtype=dtype, device=student.device)  # (pairs,)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty(total, student_vocab, dtype=dtype, device=student.device) if want_grad else None
        k = min(student_vocab, teacher_vocab)
        for lo in range(0, total, chunk):
            hi = min(total, lo + chunk)
            p_s = torch.softmax(student[s_rows[lo:hi], :student_vocab].to(dtype), -1)  # (rows, V_s)
            p_t = torch.softmax(teacher[t_rows[lo:hi], :teacher_vocab].to(dtype), -1)  # (rows, V_t)
            t_sorted, _ = _descending(p_t, with_order=False)  # (rows, V_t)
            s_sorted, order = _descending(p_s, with_order=want_grad)  # (rows, V_s)
            diff = s_sorted[:, :k] - t_sorted[:, :k]
            values[lo:hi] = diff.abs().sum(-1) + s_sorted[:, k:].sum(-1) + t_sorted[:, k:].sum(-1)
            if want_grad:
                g_sorted = torch.ones_like(s_sorted)  # a student tail beyond V_t meets zero padding: +1
                g_sorted[:, :k] = torch.sign(diff)
                g_p = torch.empty_like(g_sorted).scatter_(1, order.to(g_sorted.device), g_sorted)  # vocab order
                grad[lo:hi] = p_s * (g_p - (p_s * g_p).sum(-1, keepdim=True))  # through the softmax
        ctx.save_for_backward(grad, s_rows)
        ctx.grid_shape = student.shape
        ctx.student_vocab = student_vocab
        return values

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad, s_rows = ctx.saved_tensors
        if grad is None:
            return (None,) * 7
        full = torch.zeros(ctx.grid_shape, dtype=grad.dtype, device=grad.device)  # (grid rows, head rows)
        full[:, : ctx.student_vocab].index_add_(0, s_rows, grad * grad_out.unsqueeze(-1).to(grad.dtype))
        return full, None, None, None, None, None, None


def uld_distance_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, s_rows: torch.Tensor,
                     t_rows: torch.Tensor, student_vocab: int, teacher_vocab: int,
                     chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Σ_pairs of the sorted-probability L1 distance; differentiable w.r.t. `student_logits` only, chunked."""
    student = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    chunk = max(1, chunk_elements // max(student_vocab, teacher_vocab))
    return _SortedL1.apply(student, teacher, s_rows, t_rows, student_vocab, teacher_vocab, chunk).sum()


@register_method
class ULD(DistillationMethod):
    """Sorted-probability L1 between student and teacher at index-aligned response positions."""

    name = "uld"
    title = "ULD"
    Options = MethodOptions

    @classmethod
    def teacher_temperature(cls, options: MethodOptions) -> float:
        return 1.0  # ULD compares distributions without temperature

    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        s_out, t_out = inputs.student_out, inputs.teacher_out
        s_logits, s_index = s_out.label_logits(inputs.student)  # heads run at the label rows only
        t_logits, t_index = t_out.label_logits(inputs.teacher)
        ce = label_cross_entropy_sum(s_logits, inputs.student, s_out.vocab_size) / inputs.num_items
        s_rows, t_rows = paired_rows(inputs.student.label_mask, inputs.teacher.label_mask)
        uld = uld_distance_sum(s_logits, t_logits, s_index.index_select(0, s_rows), t_index.index_select(0, t_rows),
                               s_out.vocab_size, t_out.vocab_size)
        kd = uld / inputs.num_items
        rate = self.options.kd_rate
        loss = (1.0 - rate) * ce + rate * kd
        stats = {"paired_fraction": s_rows.numel() / max(1, int(inputs.student.label_mask.sum()))}
        return LossOutput(loss, {"ce": ce.detach(), "uld": kd.detach()}, stats)
