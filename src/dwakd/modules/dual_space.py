"""What one dual-space KD pass produces, before token weighting and normalisation (shared by DSKD-CMA and DSKDv2).

Both dual-space methods (`dskd` with cross-model attention, `dskdv2` with exact token alignment) compute, per
micro-batch, a student cross-entropy, the projected-teacher cross-entropy t2s_ce, and two per-row divergences:
t2s_div in the student's vocabulary (one value per student-space row) and s2t_div in the teacher's (one value per
teacher-space row). How those rows are scaled — DSKD's correctness mask, DSKDv2's agreement mask, or DWA-KD's token
weights (`dwakd.modules.dwa`) — is decided afterwards, which is why the rows and the logits at them are kept here.
See docs/methods.md#4-dskd-cma and #5-dwa-kd.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DualSpaceTerms:
    """Unnormalised sums and per-row divergences of one dual-space pass.

    `t2s_div[k]` belongs to the flat student position `student_rows[k]` and `s2t_div[k]` to the flat teacher position
    `teacher_rows[k]`; `student_mask` / `teacher_mask` mark the same positions on the padded grids (per-sequence
    weight rescaling runs over them). `student_logits` holds the student's logits at (at least) those positions:
    `student_index` maps a flat position to its row (−1 elsewhere), or is None when the rows are exactly the True
    entries of `student_mask` in row-major order. The same for the teacher.

    With the fused LM head + divergence op (`head_fusion: fused`) the logits of a space are never formed: its
    logits fields are None and the τ = 1 statistics DWA-KD's token weights need come per row instead
    (`student_entropy` and `t2s_peak` in `student_rows` order, `teacher_entropy` in `teacher_rows` order, nats).
    The dense path sets them too where its divergence pass computes them (forward KL on CPU); where a statistic is
    set, DWA-KD reads it instead of the logits.
    """

    ce: torch.Tensor  # scalar: Σ −log q_s(y) over every student label token
    t2s_ce: torch.Tensor  # scalar: Σ CE of the projected teacher in the student vocabulary
    t2s_div: torch.Tensor  # (P,) D(t2s → student) per student-space row
    s2t_div: torch.Tensor  # (Q,) D(teacher → s2t) per teacher-space row
    t2s_mask: torch.Tensor  # (P,) bool: DSKD's argmax-correctness / DSKDv2's agreement mask
    t2s_logits: torch.Tensor | None  # (P, V_s) projected teacher in the student vocabulary, `student_rows` order
    student_rows: torch.Tensor  # (P,) int64 flat positions on the (batch, n) grid
    teacher_rows: torch.Tensor  # (Q,) int64 flat positions on the (batch, m) grid
    student_mask: torch.Tensor  # (batch, n) bool
    teacher_mask: torch.Tensor  # (batch, m) bool
    student_logits: torch.Tensor | None  # (rows, ≥V_s) student logits (head padding rows allowed)
    teacher_logits: torch.Tensor | None  # (rows, ≥V_t) teacher logits, detached
    student_vocab: int
    teacher_vocab: int
    student_index: torch.Tensor | None = None  # (batch·n,) flat position → row of student_logits
    teacher_index: torch.Tensor | None = None  # (batch·m,) flat position → row of teacher_logits
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    student_entropy: torch.Tensor | None = None  # (P,) H(softmax(z_s)) at τ = 1 (always set when no student_logits)
    t2s_peak: torch.Tensor | None = None  # (P,) max softmax(t2s_logits) (always set when no t2s_logits)
    teacher_entropy: torch.Tensor | None = None  # (Q,) H(softmax(z_t)) at τ = 1 (always set when no teacher_logits)
