"""DSKD with cross-model attention (DSKD-CMA, SPEC §4; Zhang et al. 2024): dual-space KD across tokenizers.

Per micro-batch, with every sum over valid response positions divided by `inputs.num_items`:

    CE      = Σ_i −log q_s(y_i)                                           (student, plain cross-entropy)
    t2s_ce  = Σ_i −log softmax(t2s_logits_i)(y_i)                          (trains query and t2s only)
    t2s_kd  = Σ_i [argmax t2s_logits_i = y_i] · D(t2s_logits_i detached → z_s,i)   (D picked by `kd_objective`)
    s2t_kd  = Σ_j KL(z_t,j → s2t_logits_j)                                 (always forward KL)
    loss    = (1 − kd_rate)·CE + kd_rate·(t2s_ce + t2s_kd + s2t_kd)

t2s_logits = (a·V_t)·W_sᵀ and s2t_logits = (a'·V_s)·W_tᵀ with both heads detached and sliced to the real
vocabulary; they are formed at valid positions only. KD terms use temperature τ on both sides, t2s_ce uses none
(as DSKD's code). No τ² factor.

`DSKD.dual_space_terms` is shared with DWA-KD, which only swaps the per-position scales of t2s_kd and s2t_kd; so
DWA-KD with weights and DTW off runs exactly this code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dwakd.methods.base import (
    DistillationInputs,
    DistillationMethod,
    LossOutput,
    MethodContext,
    MethodOptions,
)
from dwakd.methods.registry import register_method
from dwakd.modules.cross_attention import CrossModelAttention, cross_model_attention
from dwakd.modules.divergences import compute_dtype, divergence, resolve_divergence
from dwakd.modules.projectors import DualSpaceProjectors, model_dims
from dwakd.modules.token_weights import valid_rows


@dataclass
class DSKDOptions(MethodOptions):
    """Options of DSKD-CMA: kd_rate, τ, and the divergence of the student-space KD term."""

    kd_objective: str = "fkl"  # fkl | rkl | sfkl | srkl | js | akl (DSKD's long names accepted)
    skew_lambda: float = 0.1  # λ of the skewed KLs
    akl_alpha: float = 0.5  # head/tail split of adaptive KL


@dataclass
class DualSpaceTerms:
    """Unnormalised sums and intermediates of one DSKD-CMA pass (sums are fp32 scalars over the micro-batch)."""

    ce: torch.Tensor
    t2s_ce: torch.Tensor
    t2s_kd: torch.Tensor
    s2t_kd: torch.Tensor
    cma: CrossModelAttention
    t2s_logits: torch.Tensor  # (student positions, V_s) at valid student positions, with grad to query/t2s
    t2s_correct: torch.Tensor  # (student positions,) bool: argmax(t2s_logits) == gold label
    stats: dict[str, torch.Tensor]
    student_logits: torch.Tensor | None = None  # (student positions, V_s) the student's own logits there
    teacher_logits: torch.Tensor | None = None  # (teacher positions, V_t) the teacher's logits, detached


@register_method
class DSKD(DistillationMethod):
    """DSKD-CMA: cross-model attention aligns the two sequences; KD in the student and the teacher space."""

    name = "dskd"
    Options = DSKDOptions
    needs_teacher = True
    needs_hidden_states = True

    def __init__(self, options: DSKDOptions, context: MethodContext):
        super().__init__(options, context)
        if context.teacher_config is None:
            raise ValueError(f"method {self.name!r} needs a teacher: set `teacher:` in the config")
        self.kd_objective = resolve_divergence(options.kd_objective)
        self.projectors = DualSpaceProjectors(
            model_dims(context.student_config), model_dims(context.teacher_config), self.uses_embedding_projector()
        )

    def uses_embedding_projector(self) -> bool:
        """Whether the projector set includes P_emb (DWA-KD's embedding Soft-DTW); never for DSKD."""
        return False

    # ---- per-position scales of the two KD terms (overridden by DWA-KD) -------------------------------------------
    def kd_scales(
        self, inputs: DistillationInputs, terms: DualSpaceTerms, student_rows: torch.Tensor, teacher_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale per valid student position for t2s_kd and per valid teacher position for s2t_kd (None = 1).

        DSKD: t2s_kd counts only positions where the projected teacher's argmax is the gold token.
        """
        return terms.t2s_correct.float(), None

    # ---- the shared dual-space computation -----------------------------------------------------------------------
    def dual_space_terms(self, inputs: DistillationInputs) -> DualSpaceTerms:
        """CE, t2s_ce, t2s_kd and s2t_kd sums (not yet divided by num_items) plus what DWA-KD reuses."""
        opts: DSKDOptions = self.options
        student, teacher = inputs.student, inputs.teacher
        s_out, t_out = inputs.student_out, inputs.teacher_out
        if teacher is None or t_out is None:
            raise ValueError(f"method {self.name!r} needs the teacher's view and outputs in the batch")
        v_s, v_t = s_out.vocab_size, t_out.vocab_size

        cma = cross_model_attention(self.projectors, student, teacher, s_out, t_out)

        # student space: teacher information read at each valid student position (= every label position)
        s_rows = valid_rows(cma.student_mask)  # (P,)
        targets = student.labels.reshape(-1).index_select(0, s_rows)  # (P,)
        student_logits = s_out.logits_at(s_rows)[:, :v_s]  # (P, V_s): the head runs at these rows only
        ce = F.cross_entropy(student_logits.float(), targets, reduction="sum")
        head_s = s_out.output_head_weight()[:v_s].detach()  # (V_s, d_s)
        t2s_hidden = cma.t2s_hidden.reshape(-1, cma.t2s_hidden.shape[-1]).index_select(0, s_rows)  # (P, d_s)
        t2s_logits = F.linear(t2s_hidden.to(head_s.dtype), head_s)  # (P, V_s)
        t2s_ce = F.cross_entropy(t2s_logits.to(compute_dtype(t2s_logits)), targets, reduction="sum")
        with torch.no_grad():
            t2s_correct = t2s_logits.argmax(-1).eq(targets)  # (P,)
        t2s_div = divergence(
            student_logits, t2s_logits.detach(), self.kd_objective, opts.kd_temperature,
            skew_lambda=opts.skew_lambda, akl_alpha=opts.akl_alpha,
        )  # (P,)

        # teacher space: student information read at each valid teacher position
        t_rows = valid_rows(cma.teacher_mask)  # (Q,)
        head_t = t_out.output_head_weight()[:v_t].detach()  # (V_t, d_t)
        s2t_hidden = cma.s2t_hidden.reshape(-1, cma.s2t_hidden.shape[-1]).index_select(0, t_rows)  # (Q, d_t)
        s2t_logits = F.linear(s2t_hidden.to(head_t.dtype), head_t)  # (Q, V_t)
        teacher_logits = t_out.logits_at(t_rows)[:, :v_t].detach()  # (Q, V_t)
        s2t_div = divergence(s2t_logits, teacher_logits, "fkl", opts.kd_temperature)  # (Q,)

        zero = t2s_div.new_zeros(())
        terms = DualSpaceTerms(ce, t2s_ce, zero, zero, cma, t2s_logits, t2s_correct, {}, student_logits,
                               teacher_logits)
        t2s_scale, s2t_scale = self.kd_scales(inputs, terms, s_rows, t_rows)
        terms.t2s_kd = (t2s_div * t2s_scale).sum()
        terms.s2t_kd = s2t_div.sum() if s2t_scale is None else (s2t_div * s2t_scale).sum()
        with torch.no_grad():
            count = max(1, s_rows.numel())
            terms.stats["t2s_acc"] = t2s_correct.float().sum() / count
        return terms

    def loss_weights(self) -> tuple[float, float]:
        """(weight of CE, weight of KD) in the total loss: (1 − kd_rate, kd_rate)."""
        return 1.0 - self.options.kd_rate, self.options.kd_rate

    def dual_space_loss(
        self, terms: DualSpaceTerms, num_items: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """w_ce·CE + w_kd·(t2s_ce + t2s_kd + s2t_kd) with every sum divided by num_items, and those parts."""
        n = num_items
        ce, t2s_ce, t2s_kd, s2t_kd = terms.ce / n, terms.t2s_ce / n, terms.t2s_kd / n, terms.s2t_kd / n
        kd = t2s_ce + t2s_kd + s2t_kd
        w_ce, w_kd = self.loss_weights()
        loss = w_ce * ce + w_kd * kd
        return loss, {"ce": ce, "t2s_ce": t2s_ce, "t2s_kd": t2s_kd, "s2t_kd": s2t_kd, "kd": kd}

    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        """(1 − kd_rate)·CE + kd_rate·(t2s_ce + t2s_kd + s2t_kd), every sum divided by num_items."""
        terms = self.dual_space_terms(inputs)
        loss, parts = self.dual_space_loss(terms, inputs.num_items)
        return LossOutput(loss, {k: v.detach() for k, v in parts.items()}, terms.stats)
