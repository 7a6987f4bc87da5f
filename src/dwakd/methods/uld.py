"""ULD — Universal Logit Distillation (Boizard et al., arXiv 2402.12030), SPEC §6.

Per position, both distributions are taken without temperature, sorted in decreasing order, the smaller
vocabulary zero-padded, and compared with an L1 distance (the closed form of the Wasserstein-1 distance the
paper uses). Positions are paired index by index from the first response token of each side, for
min(n, m) positions per sequence. loss = (1 − kd_rate)·CE + kd_rate·Σ L1 / num_items.

Differences from the reference code (DSKD's `universal_logit_distillation.py`), all SPEC-driven:
- the sum over positions is divided by the global student token count (SPEC §2), like every term here;
- head rows beyond the tokenizer's vocabulary are dropped before the softmax (the reference keeps them);
- `kd_temperature` is not used (the reference has no temperature in ULD either).
Memory: rows are processed in chunks under activation checkpointing, so the sorted (positions, vocab)
tensors and sort indices exist for one chunk at a time, in forward and in backward.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from dwakd.methods.base import DistillationInputs, DistillationMethod, LossOutput, MethodOptions
from dwakd.methods.registry import register_method
from dwakd.methods.sft import token_cross_entropy_sum

CHUNK_ELEMENTS = 1 << 24  # (rows × vocab) elements per chunk


def paired_rows(student_mask: torch.Tensor, teacher_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices pairing the k-th valid student position with the k-th valid teacher position, k < min(n_b, m_b).

    Masks are (batch, n) and (batch, m); returns two int64 (pairs,) tensors into the flattened grids.
    """
    count = torch.minimum(student_mask.sum(-1), teacher_mask.sum(-1)).view(-1, 1)  # (batch, 1)
    s_keep = student_mask & (student_mask.long().cumsum(-1) <= count)  # the first `count` valid positions
    t_keep = teacher_mask & (teacher_mask.long().cumsum(-1) <= count)
    return s_keep.reshape(-1).nonzero().squeeze(1), t_keep.reshape(-1).nonzero().squeeze(1)


def _sorted_l1_sum(student: torch.Tensor, teacher: torch.Tensor, s_rows: torch.Tensor, t_rows: torch.Tensor,
                   student_vocab: int, teacher_vocab: int) -> torch.Tensor:
    """Σ over the given rows of ‖sort↓(softmax z_s) − sort↓(softmax z_t)‖₁ with the shorter vector zero-padded."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    p_s = torch.softmax(student.index_select(0, s_rows)[:, :student_vocab].to(dtype), -1)
    p_s = p_s.sort(-1, descending=True).values  # (rows, V_s)
    with torch.no_grad():
        p_t = torch.softmax(teacher.index_select(0, t_rows)[:, :teacher_vocab].to(dtype), -1)
        p_t = p_t.sort(-1, descending=True).values  # (rows, V_t)
    k = min(student_vocab, teacher_vocab)
    # zero padding of the shorter side: its tail contributes |x − 0| = x
    l1 = (p_s[:, :k] - p_t[:, :k]).abs().sum(-1) + p_s[:, k:].sum(-1) + p_t[:, k:].sum(-1)
    return l1.sum()


def uld_distance_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, s_rows: torch.Tensor,
                     t_rows: torch.Tensor, student_vocab: int, teacher_vocab: int,
                     chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Σ_pairs of the sorted-probability L1 distance; differentiable w.r.t. `student_logits` only, chunked."""
    student = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    chunk = max(1, chunk_elements // max(student_vocab, teacher_vocab))
    total = student_logits.new_zeros((), dtype=torch.promote_types(student_logits.dtype, torch.float32))
    for lo in range(0, s_rows.numel(), chunk):
        args = (student, teacher, s_rows[lo : lo + chunk], t_rows[lo : lo + chunk], student_vocab, teacher_vocab)
        if torch.is_grad_enabled() and student.requires_grad:
            total = total + checkpoint(_sorted_l1_sum, *args, use_reentrant=False)
        else:
            total = total + _sorted_l1_sum(*args)
    return total


@register_method
class ULD(DistillationMethod):
    """Sorted-probability L1 between student and teacher at index-aligned response positions."""

    name = "uld"
    Options = MethodOptions

    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        s_out, t_out = inputs.student_out, inputs.teacher_out
        ce = token_cross_entropy_sum(s_out.logits, inputs.student, s_out.vocab_size) / inputs.num_items
        s_rows, t_rows = paired_rows(inputs.student.label_mask, inputs.teacher.label_mask)
        uld = uld_distance_sum(s_out.logits, t_out.logits, s_rows, t_rows, s_out.vocab_size, t_out.vocab_size)
        kd = uld / inputs.num_items
        rate = self.options.kd_rate
        loss = (1.0 - rate) * ce + rate * kd
        stats = {"paired_fraction": s_rows.numel() / max(1, int(inputs.student.label_mask.sum()))}
        return LossOutput(loss, {"ce": ce.detach(), "uld": kd.detach()}, stats)
