"""Attention-informed soft band for DWA-KD's Soft-DTW (paper §3.3 Eq. 19–22, Table 5).

docs/methods.md#53-attention-informed-band.

From the cross-model student→teacher attention a (rows sum to 1 over the valid teacher positions), per student
position i of a sequence with n student and m teacher response tokens (0-based indices):

    soft centre    c̃_i = Σ_j a_ij · j
    linear centre  ℓ_i = i · (m − 1)/(n − 1)          (ℓ_i = 0 when n = 1: the paper is silent, the only point)
    centre         c_i = β·c̃_i + (1 − β)·ℓ_i           β = 0.7
    width          w_i = base + κ·H_i,  H_i = −Σ_j a_ij log a_ij  (natural log, 0·log 0 = 0)   base 5, κ 2
    penalised cost C̃(i, j) = C(i, j) + ρ·[|j − c_i| > w_i]      ρ = 1 (applied by `dwakd.ops.soft_dtw.SoftBand`)

`alignment_attention` gives hosts without cross-model attention (DSKDv2) a pseudo-attention from an exact token
alignment to read the band from. The band is a constant: computed under no_grad from detached attention. Rows are
renormalised over the valid teacher columns (they already sum to 1 up to rounding, since masked scores carry −1e5).
"""

from __future__ import annotations

import torch

from dwakd.ops.soft_dtw import SoftBand


@torch.no_grad()
def attention_band(
    attn: torch.Tensor,
    lengths_student: torch.Tensor,
    lengths_teacher: torch.Tensor,
    base: float = 5.0,
    sensitivity: float = 2.0,
    blend: float = 0.7,
    penalty: float = 1.0,
) -> SoftBand:
    """Soft band (centre, width per student row) from compacted attention (batch, n, m) over valid positions.

    `attn[b, i, j]` is the attention of the i-th valid student position to the j-th valid teacher position;
    rows ≥ lengths_student[b] and columns ≥ lengths_teacher[b] are ignored (their centre is 0, width `base`).
    """
    batch, n, m = attn.shape
    a = attn.detach().to(torch.promote_types(attn.dtype, torch.float32))
    rows = torch.arange(n, device=a.device, dtype=a.dtype).view(1, n)  # (1, n)
    cols = torch.arange(m, device=a.device, dtype=a.dtype)  # (m,)
    len_s = lengths_student.to(a.device).view(batch, 1)
    len_t = lengths_teacher.to(a.device).view(batch, 1)
    a = torch.where(cols.view(1, 1, m) < len_t.view(batch, 1, 1), a, 0.0)  # valid columns only
    # The rows' moments instead of normalising the whole matrix first (the rows sum to 1 up to rounding):
    # c̃ = Σ a·j / s and H = log s − Σ a·log a / s for s = Σ a; 0·log 0 = 0 because log reads a ≥ tiny
    # (on the x86 CPU measured, log of an exact 0 took ~14× as long as of a positive float).
    total = a.sum(-1)  # (batch, n)
    total = torch.where(total > 0, total, 1.0)  # a row without attention: c̃ = 0, H = 0
    soft_center = (a * cols).sum(-1) / total
    a_log_a = (a * a.clamp_min(torch.finfo(a.dtype).tiny).log()).sum(-1)
    entropy = total.log() - a_log_a / total
    slope = (len_t - 1).to(a.dtype) / (len_s - 1).clamp_min(1).to(a.dtype)  # (batch, 1); n = 1 gives ℓ = 0
    center = blend * soft_center + (1.0 - blend) * rows * slope
    row_valid = rows < len_s  # (batch, n)
    center = torch.where(row_valid, center, 0.0)
    width = torch.where(row_valid, base + sensitivity * entropy, base)
    return SoftBand(center=center, width=width, penalty=float(penalty))


@torch.no_grad()
def alignment_attention(partner: torch.Tensor, student_mask: torch.Tensor, teacher_mask: torch.Tensor) -> torch.Tensor:
    """(batch, n, m) fp32 pseudo-attention from an exact alignment: one-hot on the partner, uniform over the gap else.

    `partner` (batch, n) holds the teacher position aligned to each student position (−1: none); alignments are
    monotonic. Valid teacher positions must be one contiguous block per row (the response), as the collator makes them.
    Rows of invalid student positions are zero.
    """
    batch, n = partner.shape
    m = teacher_mask.shape[1]
    device = partner.device
    cols = torch.arange(m, device=device)
    t_first = torch.where(teacher_mask, cols, torch.full_like(cols, m).expand_as(teacher_mask)).min(-1).values
    t_last = torch.where(teacher_mask, cols, torch.full_like(cols, -1).expand_as(teacher_mask)).max(-1).values
    anchored = (partner >= 0) & student_mask  # (batch, n)
    # teacher partner of the nearest aligned student position strictly before / after each position
    before = torch.where(anchored, partner, torch.full_like(partner, -1)).cummax(-1).values
    prev_anchor = torch.cat([torch.full_like(before[:, :1], -1), before[:, :-1]], 1)
    big = m + 1
    after = torch.where(anchored, partner, torch.full_like(partner, big)).flip(-1).cummin(-1).values.flip(-1)
    next_anchor = torch.cat([after[:, 1:], torch.full_like(after[:, :1], big)], 1)
    first, last = t_first.view(batch, 1), t_last.view(batch, 1)
    lo = torch.where(prev_anchor >= 0, prev_anchor + 1, first.expand_as(prev_anchor))
    hi = torch.where(next_anchor < big, next_anchor - 1, last.expand_as(next_anchor))
    empty = lo > hi  # no teacher token strictly between the two anchors: take the anchors themselves
    lo = torch.where(empty, torch.maximum(prev_anchor, first), lo)
    hi = torch.where(empty, torch.minimum(next_anchor, last), hi)
    lo = torch.where(anchored, partner, lo).unsqueeze(-1)  # (batch, n, 1)
    hi = torch.where(anchored, partner, hi).unsqueeze(-1)
    inside = (cols.view(1, 1, m) >= lo) & (cols.view(1, 1, m) <= hi) & teacher_mask.unsqueeze(1)
    inside &= student_mask.unsqueeze(-1)
    attn = inside.float()
    return attn / attn.sum(-1, keepdim=True).clamp_min(1.0)
