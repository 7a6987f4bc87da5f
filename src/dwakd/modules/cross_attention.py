"""Cross-model attention of DSKD-CMA: aligns student and teacher positions of one batch.

docs/methods.md#4-dskd-cma, steps 1–6 of 4.2–4.3.

Q = query([E_s(x_s); E_s(y_s)]), K = [E_t(x_t); E_t(y_t)] / std, V_t = t2s(h_t/std + E_t(y_t)/std), V_s = s2t(h_s).
Scores A = QKᵀ/√(key width), −1e5 added to every pair where either side is not a response position; the student
space reads softmax over teacher positions (a), the teacher space softmax over student positions of Aᵀ (a').
Scores, both softmaxes and both attention products run in fp32 with autocast off.

Choices where the paper is silent (docs/methods.md#45-choices-and-departures):
- each "global std" is the unbiased standard deviation over all entries at the *valid response positions* of the
  micro-batch, so padding, the prompt and dynamic-padding length do not change it (DSKD's code takes
  `tensor.std()` over the whole padded tensor, prompt and padding included);
- the score scale is √(key width) = √(2·e_t), the teacher's embedding width; the paper's √(2·d_t) is the same
  number whenever e_t = d_t, which `DualSpaceProjectors` requires of the teacher anyway;
- inputs of the projectors are cast to the projector's dtype (a bf16 model without autocast feeding fp32 projectors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dwakd.interface import ModelView, TokenView
from dwakd.modules.divergences import compute_dtype
from dwakd.modules.projectors import DualSpaceProjectors

MASK_VALUE = -1e5  # added to scores of pairs with an invalid side (DSKD's constant)


def masked_global_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased std (scalar, at least fp32) over every entry of x (batch, length, dim) where mask is True; 1 for
    fewer than two entries.

    Two passes of masked sums, with the count kept on the device: no host sync (selecting x[mask] waits for the
    device to know its size, one sync per call — three per CMA step, and more where a term recomputes a std).
    """
    x = x.detach()
    x = x.to(compute_dtype(x))
    keep = mask.to(x.dtype)  # (batch, length)
    count = mask.sum() * x.shape[-1]  # entries, on the device
    mean = (x.sum(-1) * keep).sum() / count.clamp_min(1)
    squares = (x - mean).square_().sum(-1)  # (batch, length); one temporary of x's size
    var = (squares * keep).sum() / (count - 1).clamp_min(1)
    std = var.sqrt().clamp_min(torch.finfo(x.dtype).tiny)
    return torch.where(count >= 2, std, torch.ones_like(std))


def unit_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x / `masked_global_std`(x, mask): the CMA's normalisation, one expression for every use, so the value input's
    target part (`cross_model_attention`) and its recovery (`teacher_hidden_from_values_input`) agree to the bit."""
    return x / masked_global_std(x, mask)


def project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x) with x cast to the projector's dtype (a bf16 model may feed an fp32 projector without autocast)."""
    return linear(x.to(linear.weight.dtype))


def teacher_hidden_from_values_input(value_in: torch.Tensor, table: nn.Module, teacher: TokenView) -> torch.Tensor:
    """Ĥ_t recovered from the value input Ĥ_t + E_t(y_t)/std (`CrossModelAttention.teacher_value_in`), no grad:
    the target part and its std are formed again exactly as `cross_model_attention` forms them.

    Exact up to one rounding of the sum (|error| ≤ half an ulp of the value input per entry). Lets a later term read
    Ĥ_t from a tensor the t2s projector saves for its backward anyway, instead of keeping Ĥ_t itself (or even the
    std: a term recomputed in backward then keeps no tensor of its own through the step's peak).
    """
    with torch.no_grad():
        target = teacher_target_embeddings(table, teacher)
        return value_in - unit_std(target, teacher.label_mask).to(value_in.dtype)


def masked_ids(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ids with every position where mask is False replaced by 0; -100 never reaches a table.

    docs/methods.md#42-cross-model-attention step 1.
    """
    return torch.where(mask, ids, torch.zeros_like(ids))


def lookup(table: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Embedding rows of `ids` (batch, length) -> (batch, length, dim), ids at invalid positions replaced by 0."""
    return table(masked_ids(ids, mask))


def teacher_target_embeddings(table: nn.Module, teacher: TokenView) -> torch.Tensor:
    """E_t(y_t): (batch, m, e_t) embeddings of the teacher's targets (0 where invalid), at least fp32, as the value
    input's target part is formed (`cross_model_attention`, and again in `teacher_hidden_from_values_input`)."""
    target = lookup(table, teacher.labels, teacher.label_mask)
    return target.to(compute_dtype(target))


@dataclass
class CrossModelAttention:
    """Result of one cross-model attention pass; every tensor is laid out on the padded (batch, length) grid."""

    scores: torch.Tensor  # (batch, n, m) fp32 (or float64), masked pairs carry −1e5
    t2s_attn: torch.Tensor  # (batch, n, m) softmax over teacher positions (a), dtype of scores
    s2t_attn: torch.Tensor  # (batch, m, n) softmax over student positions (a'), dtype of scores
    t2s_hidden: torch.Tensor  # (batch, n, d_s) teacher information in student space (a·V_t)
    s2t_hidden: torch.Tensor  # (batch, m, d_t) student information in teacher space (a'·V_s)
    teacher_hidden_norm: torch.Tensor  # (batch, m, d_t) at least fp32: Ĥ_t = h_t / std(h_t), no grad
    teacher_value_in: torch.Tensor  # (batch, m, d_t) the t2s input of V_t: Ĥ_t + E_t(y_t) / std, no grad
    student_mask: torch.Tensor  # (batch, n) bool m_s
    teacher_mask: torch.Tensor  # (batch, m) bool m_t
    queries: torch.Tensor | None = None  # (batch, n, 2·e_t) Q = query(S), dtype of the projector, with grad
    keys: torch.Tensor | None = None  # (batch, m, 2·e_t) K = T / std(T), at least fp32, no grad


def cross_model_attention(
    projectors: DualSpaceProjectors,
    student: TokenView,
    teacher: TokenView,
    student_out: ModelView,
    teacher_out: ModelView,
) -> CrossModelAttention:
    """DSKD's cross-model attention between the response positions of both sides.

    docs/methods.md §4.2–4.3, steps 1–4, 5a, 6a.
    """
    m_s = student.label_mask  # (batch, n)
    m_t = teacher.label_mask  # (batch, m)
    with torch.no_grad():
        s_table, t_table = student_out.input_embeddings(), teacher_out.input_embeddings()
        # (batch, n, 2·e_s) and (batch, m, 2·e_t): [embedding of the input token; embedding of its target]
        student_index = torch.cat([lookup(s_table, student.input_ids, m_s), lookup(s_table, student.labels, m_s)], -1)
        teacher_target = teacher_target_embeddings(t_table, teacher)  # (batch, m, e_t)
        teacher_input = lookup(t_table, teacher.input_ids, m_t).to(teacher_target.dtype)  # (batch, m, e_t)
        teacher_index = torch.cat([teacher_input, teacher_target], -1)
        keys = unit_std(teacher_index, m_t)  # (batch, m, 2·e_t)
        teacher_hidden = teacher_out.last_hidden.detach()
        teacher_hidden = teacher_hidden.to(compute_dtype(teacher_hidden))  # (batch, m, d_t)
        teacher_hidden_norm = unit_std(teacher_hidden, m_t)
        teacher_value_in = teacher_hidden_norm + unit_std(teacher_target, m_t)

    student_hidden = student_out.last_hidden  # (batch, n, d_s)
    queries = project(projectors.query, student_index.detach())  # (batch, n, 2·e_t)
    teacher_values = project(projectors.t2s, teacher_value_in)  # (batch, m, d_s)
    student_values = project(projectors.s2t, student_hidden)  # (batch, n, d_t)

    with torch.autocast(device_type=student_hidden.device.type, enabled=False):
        pair_valid = m_s.unsqueeze(-1) & m_t.unsqueeze(1)  # (batch, n, m)
        dtype = torch.promote_types(compute_dtype(queries), keys.dtype)  # fp32 (float64 stays float64)
        scores = queries.to(dtype) @ keys.to(dtype).transpose(-1, -2) / math.sqrt(keys.shape[-1])  # (batch, n, m)
        scores = scores + (~pair_valid).to(dtype) * MASK_VALUE
        t2s_attn = torch.softmax(scores, dim=-1)  # (batch, n, m)
        s2t_attn = torch.softmax(scores.transpose(-1, -2), dim=-1)  # (batch, m, n)
        t2s_hidden = t2s_attn @ teacher_values.to(dtype)  # (batch, n, d_s)
        s2t_hidden = s2t_attn @ student_values.to(dtype)  # (batch, m, d_t)
    return CrossModelAttention(
        scores=scores,
        t2s_attn=t2s_attn,
        s2t_attn=s2t_attn,
        t2s_hidden=t2s_hidden.to(student_hidden.dtype),
        s2t_hidden=s2t_hidden.to(student_hidden.dtype),
        teacher_hidden_norm=teacher_hidden_norm,
        teacher_value_in=teacher_value_in,
        student_mask=m_s,
        teacher_mask=m_t,
        queries=queries,
        keys=keys,
    )
