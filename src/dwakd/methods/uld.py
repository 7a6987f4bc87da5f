"""ULD — Universal Logit Distillation (Boizard et al., arXiv 2402.12030), docs/methods.md#62-uld.

Per position, both distributions are taken without temperature, sorted in decreasing order, the smaller
vocabulary zero-padded, and compared with an L1 distance (the closed form of the Wasserstein-1 distance the
paper uses). Positions are paired index by index from the first response token of each side, for
min(n, m) positions per sequence. loss = (1 − kd_rate)·CE + kd_rate·Σ L1 / num_items.

Differences from the reference code (DSKD's `universal_logit_distillation.py`), listed in docs/methods.md#62-uld:
- the sum over positions is divided by the global student token count (docs/methods.md §2.1), like every term here;
- head rows beyond the tokenizer's vocabulary are dropped before the softmax (the reference keeps them);
- `kd_temperature` is not used (the reference has no temperature in ULD either).
Speed and memory: `head_fusion: dense` forms both sides' logits at the label rows and the gradient during forward,
chunk by chunk (`_SortedL1`), so sorted copies and sort indices exist for one chunk at a time and only the
(positions, V_s) gradient is kept for backward. `fused` (`auto` on a GPU or under 16-bit autocast) reads hidden
states and head weights instead (`dwakd.ops.fused_kd.fused_head_sorted_l1`; the CE through the fused CE op): no
(rows × V) logits or logit gradient for the whole batch. On CPU the sorts run in NumPy, several times faster than
torch.sort on 50k–150k-wide rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dwakd.methods.base import DistillationInputs, DistillationMethod, LossOutput, MethodOptions, check_choice
from dwakd.methods.registry import register_method
from dwakd.modules.cross_entropy import label_cross_entropy_sum, student_cross_entropy_sum
from dwakd.modules.head_fusion import HEAD_FUSIONS, use_fused_heads
from dwakd.modules.rows import paired_rows
from dwakd.ops.fused_kd.sorted_l1 import fused_head_sorted_l1, sorted_l1_rows

CHUNK_ELEMENTS = 1 << 24  # (rows × vocab) elements per chunk


class _SortedL1(torch.autograd.Function):
    """Per-row sorted-probability L1 (`sorted_l1_rows`) from dense logits; the gradient is formed in forward, by chunk.

    Only that gradient, (pairs, V_s), is kept for backward; sorted copies and indices live for one chunk.
    """

    @staticmethod
    def forward(ctx, student, teacher, s_rows, t_rows, student_vocab, teacher_vocab, chunk):  # type: ignore[override]
        dtype = torch.promote_types(student.dtype, torch.float32)
        total = s_rows.numel()
        values = torch.empty(total, dtype=dtype, device=student.device)  # (pairs,)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty(total, student_vocab, dtype=dtype, device=student.device) if want_grad else None
        for lo in range(0, total, chunk):
            hi = min(total, lo + chunk)
            values[lo:hi], g = sorted_l1_rows(student[s_rows[lo:hi], :student_vocab].to(dtype),
                                              teacher[t_rows[lo:hi], :teacher_vocab].to(dtype), want_grad)
            if want_grad:
                grad[lo:hi] = g
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


@dataclass
class ULDOptions(MethodOptions):
    """ULD reads `kd_rate` and `head_fusion` (`kd_temperature` is unused: ULD has no temperature)."""

    # fused: LM heads + sorted L1 (and the CE) in chunked ops, no (rows × V) logits | dense: logits at the label rows
    # | auto: fused on a GPU or under bf16 autocast, else dense
    head_fusion: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("head_fusion", self.head_fusion, HEAD_FUSIONS)


@register_method
class ULD(DistillationMethod):
    """Sorted-probability L1 between student and teacher at index-aligned response positions."""

    name = "uld"
    title = "ULD"
    Options = ULDOptions

    @classmethod
    def teacher_temperature(cls, options: MethodOptions) -> float:
        return 1.0  # ULD compares distributions without temperature

    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        s_out, t_out = inputs.student_out, inputs.teacher_out
        s_rows, t_rows = paired_rows(inputs.student.label_mask, inputs.teacher.label_mask)
        s_weight = None
        if use_fused_heads(self.options.head_fusion, inputs.student.labels.device):
            s_weight = s_out.linear_head_weight()
        if s_weight is not None:  # no (rows × V) logits: the heads run inside the fused ops
            ce = student_cross_entropy_sum(s_out, inputs.student, "fused") / inputs.num_items
            t_weight = t_out.linear_head_weight()
            teacher = ({"t_hidden": t_out.hidden_at(t_rows).detach(), "t_weight": t_weight.detach()}
                       if t_weight is not None else {"t_logits": t_out.logits_at(t_rows).detach()})
            uld = fused_head_sorted_l1(s_out.hidden_at(s_rows), s_weight, s_out.vocab_size, t_out.vocab_size,
                                       **teacher)
        else:
            s_logits, s_index = s_out.label_logits(inputs.student)  # heads run at the label rows only
            t_logits, t_index = t_out.label_logits(inputs.teacher)
            ce = label_cross_entropy_sum(s_logits, inputs.student, s_out.vocab_size) / inputs.num_items
            uld = uld_distance_sum(s_logits, t_logits, s_index.index_select(0, s_rows),
                                   t_index.index_select(0, t_rows), s_out.vocab_size, t_out.vocab_size)
        kd = uld / inputs.num_items
        rate = self.options.kd_rate
        loss = (1.0 - rate) * ce + rate * kd
        stats = {"paired_fraction": s_rows.numel() / max(1, int(inputs.student.label_mask.sum()))}
        return LossOutput(loss, {"ce": ce.detach(), "uld": kd.detach()}, stats)
