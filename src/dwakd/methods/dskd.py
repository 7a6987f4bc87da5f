"""DSKD with cross-model attention (DSKD-CMA; Zhang et al. 2024): dual-space KD across tokenizers.

Per micro-batch, with every sum over valid response positions divided by `inputs.num_items`:

    CE      = Σ_i −log q_s(y_i)                                           (student, plain cross-entropy)
    t2s_ce  = Σ_i −log softmax(t2s_logits_i)(y_i)                          (trains query and t2s only)
    t2s_kd  = Σ_i [argmax t2s_logits_i = y_i] · D(t2s_logits_i detached → z_s,i)   (D picked by `kd_objective`)
    s2t_kd  = Σ_j KL(z_t,j → s2t_logits_j)                                 (always forward KL)
    loss    = (1 − kd_rate)·CE + kd_rate·(t2s_ce + t2s_kd + s2t_kd)

t2s_logits = (a·V_t)·W_sᵀ and s2t_logits = (a'·V_s)·W_tᵀ with both heads detached and sliced to the real
vocabulary; they are formed at valid positions only. KD terms use temperature τ on both sides, t2s_ce uses none
(as DSKD's code). No τ² factor. With `head_fusion: fused` (default) each space is one `fused_head_kd` call on the
hidden states and heads (no (rows × V) logits kept; DWA-KD's entropies and gate come from its statistics) wherever
the model view defers its head; `dense` is the plain `F.linear` + `divergence` reference. The loss assembly is
`DualSpaceMethod`'s; `dwakd` is this method with the DWA-KD component attached. Every choice and departure from
the authors' code: docs/methods.md#4-dskd-cma.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dwakd.methods.base import DistillationInputs, MethodContext, MethodOptions, check_choice, check_range
from dwakd.methods.dual_space_base import DualSpaceMethod
from dwakd.methods.registry import register_method
from dwakd.modules.cross_attention import (
    CrossModelAttention,
    cross_model_attention,
    project,
    teacher_hidden_from_values_input,
)
from dwakd.modules.divergences import (
    check_divergence,
    compute_dtype,
    divergence_and_statistics,
    resolve_divergence,
)
from dwakd.modules.dual_space import DualSpaceTerms
from dwakd.modules.head_fusion import HEAD_FUSIONS
from dwakd.modules.projectors import DualSpaceProjectors, model_dims
from dwakd.modules.rows import valid_rows
from dwakd.ops.fused_kd import fused_head_kd
from dwakd.ops.row_ce import label_ce_rows
from dwakd.options import check_steps


@dataclass
class DSKDOptions(MethodOptions):
    """Options of DSKD-CMA: kd_rate, τ, and the divergence of the student-space KD term."""

    kd_objective: str = "fkl"  # fkl | rkl | sfkl | srkl | js | akl (DSKD's long names accepted)
    skew_lambda: float = 0.1  # λ of the skewed KLs
    akl_alpha: float = 0.5  # head/tail split of adaptive KL
    # t2s_kd scaled by min(1, (step + 1) / kd_warmup_steps): the student-space KD term ramps up over the first steps
    # (the public DWA-KD code: 300); 0 = off
    kd_warmup_steps: int = 0
    # fused: LM head + divergence in one op, no (rows × V) logits | dense: F.linear logits
    # | auto: fused on a GPU or under bf16 autocast, else dense
    head_fusion: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("head_fusion", self.head_fusion, HEAD_FUSIONS)
        check_divergence("kd_objective", self.kd_objective)
        check_range("skew_lambda", self.skew_lambda, 0.0, 1.0)
        check_range("akl_alpha", self.akl_alpha, 0.0, 1.0)
        check_steps("kd_warmup_steps", self.kd_warmup_steps)


@dataclass
class CMATerms(DualSpaceTerms):
    """DSKD-CMA's dual-space terms plus the cross-model attention pass they came from."""

    cma: CrossModelAttention | None = None


@register_method
class DSKD(DualSpaceMethod):
    """DSKD-CMA: cross-model attention aligns the two sequences; KD in the student and the teacher space."""

    name = "dskd"
    title = "DSKD"
    Options = DSKDOptions

    def __init__(self, options: DSKDOptions, context: MethodContext):
        super().__init__(options, context)
        self.kd_objective = resolve_divergence(options.kd_objective)
        self.projectors = DualSpaceProjectors(model_dims(context.student_config), model_dims(context.teacher_config))

    def align_spaces(self, inputs: DistillationInputs) -> CrossModelAttention:
        """The cross-model attention between the response positions of both sides."""
        if inputs.teacher is None or inputs.teacher_out is None:
            raise ValueError(f"method {self.name!r} needs the teacher's view and outputs in the batch")
        return cross_model_attention(self.projectors, inputs.student, inputs.teacher, inputs.student_out,
                                     inputs.teacher_out)

    def dual_space_terms(self, inputs: DistillationInputs, alignment: CrossModelAttention) -> CMATerms:
        """CE, t2s_ce and the per-row divergences at every valid position of each side (`alignment`: the CMA)."""
        opts: DSKDOptions = self.options
        student, teacher = inputs.student, inputs.teacher
        s_out, t_out = inputs.student_out, inputs.teacher_out
        v_s, v_t = s_out.vocab_size, t_out.vocab_size
        cma = alignment

        # student space: teacher information read at each valid student position (= every label position)
        s_rows = valid_rows(cma.student_mask)  # (P,)
        targets = student.labels.reshape(-1).index_select(0, s_rows)  # (P,)
        t2s_hidden = cma.t2s_hidden.reshape(-1, cma.t2s_hidden.shape[-1]).index_select(0, s_rows)  # (P, d_s)
        head_w = s_out.linear_head_weight() if self.fused_heads(student.input_ids.device) else None
        want_stats = self.token_statistics()
        student_entropy = t2s_peak = teacher_entropy = None
        if head_w is not None:  # fused: z_s and t2s_logits only chunk by chunk inside the op
            rows = fused_head_kd(
                s_out.hidden_at(s_rows), head_w, t2s_hidden, head_w.detach(), vocab_size=v_s,
                divergence=self.kd_objective, temperature=opts.kd_temperature, pred_labels=targets,
                target_labels=targets, skew_lambda=opts.skew_lambda, akl_alpha=opts.akl_alpha,
                statistics=("target_argmax", "pred_entropy", "target_peak") if want_stats else ("target_argmax",),
            )
            ce, t2s_ce, t2s_div = rows.pred_ce.sum(), rows.target_ce.sum(), rows.divergence  # (P,) divergence
            t2s_correct = rows.target_argmax.eq(targets)  # (P,)
            student_entropy, t2s_peak = rows.pred_entropy, rows.target_peak
            student_logits = t2s_logits = None
        else:
            student_logits = s_out.logits_at(s_rows)[:, :v_s]  # (P, V_s): the head runs at these rows only
            ce = label_ce_rows(student_logits, targets)[0].sum()  # fp32 (`dwakd.ops.row_ce`)
            head_s = s_out.output_head_weight()[:v_s].detach()  # (V_s, d_s)
            t2s_logits = F.linear(t2s_hidden.to(head_s.dtype), head_s)  # (P, V_s)
            t2s_ce_rows, t2s_argmax = label_ce_rows(t2s_logits.to(compute_dtype(t2s_logits)), targets,
                                                     with_argmax=True)
            t2s_ce = t2s_ce_rows.sum()
            t2s_correct = t2s_argmax.eq(targets)  # (P,): the argmax comes from the CE's own pass
            t2s_div, s_stats = divergence_and_statistics(
                student_logits, t2s_logits.detach(), self.kd_objective, opts.kd_temperature,
                ("student_entropy", "teacher_peak") if want_stats else (),
                skew_lambda=opts.skew_lambda, akl_alpha=opts.akl_alpha,
            )  # (P,); DWA-KD's τ = 1 statistics from the same pass where the kernel allows (forward KL on CPU)
            student_entropy, t2s_peak = s_stats.get("student_entropy"), s_stats.get("teacher_peak")

        # teacher space: student information read at each valid teacher position
        t_rows = valid_rows(cma.teacher_mask)  # (Q,)
        s2t_hidden = cma.s2t_hidden.reshape(-1, cma.s2t_hidden.shape[-1]).index_select(0, t_rows)  # (Q, d_t)
        teacher_w = t_out.linear_head_weight() if self.fused_heads(teacher.input_ids.device) else None
        if teacher_w is not None:  # fused: the frozen teacher head on both sides, one matmul per chunk
            teacher_w = teacher_w.detach()
            rows = fused_head_kd(
                s2t_hidden, teacher_w, t_out.hidden_at(t_rows).detach(), teacher_w, vocab_size=v_t,
                divergence="fkl", temperature=opts.kd_temperature,
                statistics=("target_entropy",) if want_stats else (),
            )
            s2t_div, teacher_entropy, teacher_logits = rows.divergence, rows.target_entropy, None  # (Q,)
        else:
            head_t = t_out.output_head_weight()[:v_t].detach()  # (V_t, d_t)
            s2t_logits = F.linear(s2t_hidden.to(head_t.dtype), head_t)  # (Q, V_t)
            teacher_logits = t_out.logits_at(t_rows)[:, :v_t].detach()  # (Q, V_t)
            s2t_div, t_stats = divergence_and_statistics(
                s2t_logits, teacher_logits, "fkl", opts.kd_temperature, ("teacher_entropy",) if want_stats else ()
            )  # (Q,)
            teacher_entropy = t_stats.get("teacher_entropy")

        with torch.no_grad():
            stats = {"t2s_acc": t2s_correct.float().sum() / max(1, s_rows.numel())}
        return CMATerms(
            ce=ce, t2s_ce=t2s_ce, t2s_div=t2s_div, s2t_div=s2t_div, t2s_mask=t2s_correct, t2s_logits=t2s_logits,
            student_rows=s_rows, teacher_rows=t_rows, student_mask=cma.student_mask, teacher_mask=cma.teacher_mask,
            student_logits=student_logits, teacher_logits=teacher_logits, student_vocab=v_s, teacher_vocab=v_t,
            stats=stats, cma=cma, student_entropy=student_entropy, t2s_peak=t2s_peak, teacher_entropy=teacher_entropy,
        )

    def recomputed_dtw_loss(self, inputs: DistillationInputs, alignment: CrossModelAttention, gamma: float
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """DWA-KD's Soft-DTW term right after the CMA, recomputed in backward, fed only tensors this graph saves.

        Those are the student's last hidden state (saved by the s2t projector), the t2s projector's value input
        Ĥ_t + E_t(y)/std (from which the hidden term's Ĥ_t is recovered, `teacher_hidden_from_values_input`) and
        the attention a (saved by a·V_t). Each is the saved tensor itself only with the projectors in the states'
        dtype and autocast off; otherwise (and for `dtw_hidden_input: raw`, whose raw teacher states nothing saves)
        None: the terms are built after the vocabulary terms.
        """
        dwa = self.dwa
        hidden = inputs.student_out.last_hidden
        value_in = alignment.teacher_value_in
        if (dwa.options.dtw_hidden_input != "normalized" or torch.is_autocast_enabled(hidden.device.type)
                or hidden.dtype != self.projectors.s2t.weight.dtype
                or value_in.dtype != self.projectors.t2s.weight.dtype):
            return None
        t2s, table, teacher = self.projectors.t2s, inputs.teacher_out.input_embeddings(), inputs.teacher

        def teacher_hidden(source: torch.Tensor) -> torch.Tensor:  # t2s(Ĥ_t), (batch, m, d_s)
            return project(t2s, teacher_hidden_from_values_input(source, table, teacher))

        attention = alignment.t2s_attn.detach() if dwa.options.dtw == "banded" else None
        return dwa.recomputed_dtw_loss(inputs, value_in, teacher_hidden, [t2s], attention, gamma)

    def dtw_teacher_hidden(self, inputs: DistillationInputs, terms: CMATerms) -> torch.Tensor:
        """t2s(h_t / std(h_t)) — the projector shared with the attention values — or t2s(h_t) (`raw`, reference)."""
        if self.dwa is not None and self.dwa.options.dtw_hidden_input == "raw":
            teacher_hidden = inputs.teacher_out.last_hidden.detach()
            return project(self.projectors.t2s, teacher_hidden.to(terms.cma.teacher_hidden_norm.dtype))
        return project(self.projectors.t2s, terms.cma.teacher_hidden_norm)  # (batch, m, d_s)

    def dtw_band_attention(self, inputs: DistillationInputs, terms: CMATerms) -> torch.Tensor:
        """The cross-model student→teacher attention a (batch, n, m)."""
        return terms.cma.t2s_attn
