"""DSKDv2 — dual-space KD with projector initialisation and exact token alignment (Zhang et al., arXiv 2504.11426).

Built once from `MethodContext` (both tokenizers and both LM heads):
- the shared vocabulary: every teacher token whose decoded text is byte-identical to a student token
  (`dwakd.alignment.vocab_map.exact_text_map`; EOS ↔ EOS). With identical tokenizers: the whole vocabulary;
- t2s = Linear(d_t → d_s, no bias) initialised by pseudo-inverse so that t2s(h_t)·W_sᵀ ≈ h_t·W_tᵀ on the shared
  vocabulary: W_t2s = (W_t,shared · pinv(W_s,shared))ᵀ (heads as (d, K) column blocks);
- pinv(W_t,shared) (K, d_t), kept as a non-persistent buffer: every step the teacher-space projector is
  recomputed from the *current* student head, s2t = W_s,sharedᵀ-block · pinv(W_t,shared), and is not trained.

Per micro-batch (every sum divided by `inputs.num_items`, docs/methods.md §2.1):
- exact token alignment of the label tokens (`dwakd.alignment.exact`): pairs (i, j) covering the same text;
  a pair is kept when the teacher's argmax at j maps to a student token by exact text (EOS ↔ EOS);
- student space at kept pairs: t2s_logits_i = t2s(h_t,j)·W_sᵀ (W_s detached), target ŷ_i = mapped teacher argmax;
  t2s_ce = Σ CE(t2s_logits_i, ŷ_i) (trains t2s only); t2s_kd = Σ_i [argmax t2s_logits_i = ŷ_i]·D(t2s_i → z_s,i)
  (the agreement mask), D = `kd_objective` at τ;
- teacher space at kept pairs: s2t_logits_j = (h_s,i · s2t)·W_tᵀ; s2t_kd = Σ_j D(z_t,j → s2t_logits_j) at τ;
- loss = (1 − kd_rate)·CE + kd_rate·(t2s_ce + t2s_kd + s2t_kd).

Choices and differences from the reference (songmzhang/DSKDv2, `dual_space_kd_v2_with_exact_token_alignment.py`):
- alignment by character offsets (docs/methods.md §1.2, §5.7), not by the greedy two-pointer over token strings;
  `alignment: strings` selects the two-pointer (`exact_string_alignment`), `identity` the same-tokenizer path,
  `auto` (default) identity when both tokenizers decode every id identically, offsets otherwise;
- normalisation: all terms by the global student token count (the reference divides t2s_ce and s2t_kd by the
  number of aligned tokens and t2s_kd by the number of agreeing ones);
- the shared vocabulary compares decoded bytes (the reference compares token strings after "Ġ" → "▁");
- the reference's `--t2s-agreement` threshold defaults to 1.0, i.e. the agreement mask always applies; so here.
- the reference scatters projected states into zero tensors and relies on equal padded lengths on both sides; we
  gather the aligned rows instead, so lengths may differ.
`shared_vocab_limit` keeps only the first k shared tokens for the pseudo-inverse (the reference's `--topk-vocab`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dwakd.alignment.exact import exact_offset_alignment, exact_string_alignment
from dwakd.alignment.token_strings import token_table
from dwakd.alignment.vocab_map import exact_text_map
from dwakd.methods.base import DistillationInputs, MethodContext, OptionError, TokenView, check_choice
from dwakd.methods.dskd import DSKDOptions
from dwakd.methods.dual_space_base import DualSpaceMethod
from dwakd.methods.registry import register_method
from dwakd.modules.band import alignment_attention
from dwakd.modules.cross_attention import project
from dwakd.modules.cross_entropy import label_cross_entropy_sum
from dwakd.modules.divergences import compute_dtype, divergence, resolve_divergence
from dwakd.modules.dual_space import DualSpaceTerms
from dwakd.modules.projectors import model_dims
from dwakd.ops.fused_kd import fused_head_kd

ALIGNMENTS = ("auto", "offsets", "strings", "identity")


@dataclass
class DSKDv2Options(DSKDOptions):
    """DSKDv2 knobs on top of DSKD's (kd_rate, τ, kd_objective, skew_lambda, akl_alpha)."""

    alignment: str = "auto"  # auto | offsets | strings | identity
    init_t2s: bool = True  # pseudo-inverse initialisation of t2s (the reference's --init-t2s-projector)
    shared_vocab_limit: int = -1  # use only the first k shared tokens for the pseudo-inverses (−1: all)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("alignment", self.alignment, ALIGNMENTS)
        limit = self.shared_vocab_limit
        if not isinstance(limit, int) or isinstance(limit, bool) or not (limit == -1 or limit > 0):
            raise OptionError("shared_vocab_limit",
                              f"must be −1 (all shared tokens) or a positive count; got {limit!r}")


@dataclass
class AlignedPairs:
    """Kept (student, teacher) pairs as flat row indices into the padded grids, in student order."""

    student_rows: torch.Tensor  # (P,) int64, increasing
    teacher_rows: torch.Tensor  # (P,) int64
    targets: torch.Tensor  # (P,) int64 student ids: the teacher's argmax mapped to the student vocabulary
    student_mask: torch.Tensor  # (batch, n) bool: kept student positions
    teacher_mask: torch.Tensor  # (batch, m) bool: kept teacher positions
    partner: torch.Tensor  # (batch, n) int64: teacher position aligned to each student position (−1: none), unfiltered
    aligned: int  # pairs found by the alignment before the argmax-mapping filter


@dataclass
class V2Terms(DualSpaceTerms):
    """DSKDv2's dual-space terms plus the aligned pairs they live on."""

    pairs: AlignedPairs | None = None


def _head(model: nn.Module, vocab: int) -> torch.Tensor:
    """(vocab, d) detached LM-head rows of the real tokens."""
    return model.get_output_embeddings().weight[:vocab].detach()


@register_method
class DSKDv2(DualSpaceMethod):
    """DSKDv2 with exact token alignment: pinv-initialised t2s, head-derived frozen s2t, agreement-masked KD."""

    name = "dskdv2"
    title = "DSKDv2"
    Options = DSKDv2Options

    def __init__(self, options: DSKDv2Options, context: MethodContext):
        super().__init__(options, context)
        if context.teacher_tokenizer is None:
            raise ValueError(f"method {self.name!r} needs a teacher: set `teacher:` in the config")
        if context.student_model is None or context.teacher_model is None:
            raise ValueError(f"method {self.name!r} initialises its projectors from both LM heads: "
                             "MethodContext.student_model and teacher_model are required")
        self.kd_objective = resolve_divergence(options.kd_objective)
        s_table = token_table(context.student_tokenizer)
        t_table = token_table(context.teacher_tokenizer)
        self.same_tokenizer = s_table.fingerprint() == t_table.fingerprint()
        self.alignment = options.alignment
        if self.alignment == "auto":
            self.alignment = "identity" if self.same_tokenizer else "offsets"
        if self.alignment == "identity" and not self.same_tokenizer:
            raise OptionError("alignment", "identity needs identical student and teacher tokenizers")
        self._tables = (s_table, t_table)

        exact = exact_text_map(t_table, s_table)  # (V_t,) teacher id -> student id or −1
        self.register_buffer("teacher_to_student", torch.from_numpy(exact), persistent=False)
        t_shared = np.nonzero(exact >= 0)[0]
        if options.shared_vocab_limit > 0:
            t_shared = t_shared[: options.shared_vocab_limit]
        if len(t_shared) == 0:
            raise ValueError("dskdv2: the two vocabularies share no token text; the projector cannot be initialised")
        self.register_buffer("shared_student_ids", torch.from_numpy(exact[t_shared]), persistent=False)
        self.register_buffer("shared_teacher_ids", torch.from_numpy(t_shared), persistent=False)

        s_dims, t_dims = model_dims(context.student_config), model_dims(context.teacher_config)
        self.t2s = nn.Linear(t_dims.hidden, s_dims.hidden, bias=False)
        student_head = _head(context.student_model, len(s_table))  # (V_s, d_s)
        teacher_head = _head(context.teacher_model, len(t_table))  # (V_t, d_t)
        dtype = torch.promote_types(torch.promote_types(student_head.dtype, teacher_head.dtype), torch.float32)
        shared_s = self.shared_student_ids.to(student_head.device)
        shared_t = self.shared_teacher_ids.to(teacher_head.device)
        # the SVDs behind the pseudo-inverses run on a GPU when there is one (2048 × 42k for Qwen1.5-1.8B)
        device = torch.device("cuda") if torch.cuda.is_available() else student_head.device
        part_s = student_head[shared_s].to(device, dtype).T  # (d_s, K), pinv in ≥ fp32
        part_t = teacher_head[shared_t].to(device, dtype).T  # (d_t, K)
        if options.init_t2s:
            with torch.no_grad():
                self.t2s.weight.copy_((part_t @ torch.linalg.pinv(part_s)).T.cpu())  # (d_s, d_t)
        # pinv of the teacher's shared head block: s2t = W_s,shared-block · pinv(W_t,shared) each step
        self.register_buffer("teacher_head_pinv", torch.linalg.pinv(part_t).cpu(), persistent=False)  # (K, d_t)

    # ---- alignment -------------------------------------------------------------------------------------------
    def align(self, student: TokenView, teacher: TokenView) -> tuple[torch.Tensor, int]:
        """(batch, n) int64 teacher position aligned to each student position (−1: none), and the pair count."""
        if self.alignment == "identity":  # same tokenizer: position i of one side is position i of the other
            width = min(student.labels.shape[1], teacher.labels.shape[1])
            both = torch.zeros_like(student.label_mask)
            both[:, :width] = student.label_mask[:, :width] & teacher.label_mask[:, :width]
            positions = torch.arange(student.labels.shape[1], device=student.labels.device).expand_as(both)
            s2t = torch.where(both, positions, torch.full_like(positions, -1))
        elif self.alignment == "offsets":
            s2t, _ = exact_offset_alignment(student.labels, student.label_offsets, student.input_offsets,
                                            teacher.labels, teacher.label_offsets, teacher.input_offsets)
        else:
            s2t = self._string_alignment(student, teacher)
        return s2t, int((s2t >= 0).sum())

    def _string_alignment(self, student: TokenView, teacher: TokenView) -> torch.Tensor:
        """The reference's greedy two-pointer over marker-stripped token strings, per sequence (CPU)."""
        s_table, t_table = self._tables
        s_str, t_str = self._stripped()
        s_labels, t_labels = student.labels.cpu(), teacher.labels.cpu()
        out = torch.full(s_labels.shape, -1, dtype=torch.long)
        for b in range(s_labels.shape[0]):
            s_pos = s_labels[b].ne(-100).nonzero().squeeze(1).tolist()
            t_pos = t_labels[b].ne(-100).nonzero().squeeze(1).tolist()
            s_ids, t_ids = s_labels[b, s_pos].tolist(), t_labels[b, t_pos].tolist()
            pairs = exact_string_alignment(
                [t_str[i] if i < len(t_str) else "" for i in t_ids],
                [s_str[i] if i < len(s_str) else "" for i in s_ids],
                [i == t_table.eos_id for i in t_ids], [i == s_table.eos_id for i in s_ids],
            )
            for ti, si in pairs:
                out[b, s_pos[si]] = t_pos[ti]
        return out.to(student.labels.device)

    def _stripped(self) -> tuple[list[str], list[str]]:
        if not hasattr(self, "_stripped_cache"):
            self._stripped_cache = (self._tables[0].stripped_strings(), self._tables[1].stripped_strings())
        return self._stripped_cache

    def aligned_pairs(
        self, inputs: DistillationInputs, teacher_logits: torch.Tensor, teacher_index: torch.Tensor
    ) -> AlignedPairs:
        """Aligned pairs whose teacher argmax has an exact student counterpart, and the mapped targets.

        `teacher_logits` / `teacher_index` are the teacher's `ModelView.label_logits` (alignments pair labels).
        """
        student, teacher = inputs.student, inputs.teacher
        v_t = inputs.teacher_out.vocab_size
        s2t, aligned = self.align(student, teacher)  # (batch, n)
        with torch.no_grad():
            label_pred = teacher_logits[:, :v_t].argmax(-1)  # (label rows,)
            t_pred = label_pred.index_select(0, teacher_index.clamp_min(0)).view(teacher.labels.shape)  # (batch, m)
            mapped = self.map_to_student(t_pred)  # (batch, m) student id or −1
            mapped = torch.where(teacher_index.view(teacher.labels.shape) >= 0, mapped, -1)  # labels only
        return self.pairs_from_mapped(inputs, s2t, aligned, mapped)

    def map_to_student(self, teacher_ids: torch.Tensor) -> torch.Tensor:
        """Student id of each teacher id by exact text, −1 where none."""
        vocab_map = self.teacher_to_student
        teacher_ids = torch.where(teacher_ids < vocab_map.numel(), teacher_ids, torch.zeros_like(teacher_ids))
        return vocab_map[teacher_ids]

    def candidate_rows(self, inputs: DistillationInputs, s2t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(C,) flat student rows aligned to a teacher label position and (C,) those teacher rows, student order:
        the pairs `aligned_pairs` keeps once the teacher's argmax at them maps to a student token."""
        teacher = inputs.teacher
        n, m = s2t.shape[1], teacher.labels.shape[1]
        with torch.no_grad():
            candidate = (s2t >= 0) & teacher.label_mask.gather(1, s2t.clamp_min(0))  # (batch, n)
            s_rows = candidate.reshape(-1).nonzero().squeeze(1)  # (C,) increasing
            t_rows = (s_rows // n) * m + s2t.reshape(-1).index_select(0, s_rows)
        return s_rows, t_rows

    def pairs_from_mapped(self, inputs: DistillationInputs, s2t: torch.Tensor, aligned: int,
                          mapped: torch.Tensor) -> AlignedPairs:
        """AlignedPairs from the alignment and the (batch, m) mapped teacher argmax (−1: none or not a label)."""
        teacher = inputs.teacher
        with torch.no_grad():
            partner = s2t.clamp_min(0)
            target = mapped.gather(1, partner)  # (batch, n): mapped teacher argmax at the partner
            keep = (s2t >= 0) & (target >= 0)
        n, m = s2t.shape[1], teacher.labels.shape[1]
        s_rows = keep.reshape(-1).nonzero().squeeze(1)  # (P,) row-major: increasing
        batch_index = s_rows // n
        t_rows = batch_index * m + s2t.reshape(-1).index_select(0, s_rows)
        t_mask = torch.zeros(teacher.labels.shape, dtype=torch.bool, device=keep.device)
        t_mask.view(-1)[t_rows] = True
        return AlignedPairs(s_rows, t_rows, target.reshape(-1).index_select(0, s_rows), keep, t_mask, s2t, aligned)

    # ---- the dual-space computation ---------------------------------------------------------------------------
    def s2t_projection(self, student_head: torch.Tensor) -> torch.Tensor:
        """(d_s, d_t) teacher-space projector from the current (detached) student head; never trained."""
        part_s = student_head.index_select(0, self.shared_student_ids).T  # (d_s, K)
        return part_s.to(self.teacher_head_pinv.dtype) @ self.teacher_head_pinv

    def dual_space_terms(self, inputs: DistillationInputs, alignment: None = None) -> V2Terms:
        """CE, t2s_ce and the per-pair divergences at the kept aligned pairs (aligned here: `alignment` is None)."""
        opts: DSKDv2Options = self.options
        s_out, t_out = inputs.student_out, inputs.teacher_out
        if inputs.teacher is None or t_out is None:
            raise ValueError(f"method {self.name!r} needs the teacher's view and outputs in the batch")
        v_s, v_t = s_out.vocab_size, t_out.vocab_size
        fused = self.fused_heads(inputs.student.input_ids.device)
        head_w = s_out.linear_head_weight() if fused else None
        teacher_w = t_out.linear_head_weight() if fused else None
        want_stats = self.token_statistics()
        kd = dict(divergence=self.kd_objective, temperature=opts.kd_temperature, skew_lambda=opts.skew_lambda,
                  akl_alpha=opts.akl_alpha)
        head_s = s_out.output_head_weight()[:v_s].detach()  # (V_s, d_s)
        s2t = self.s2t_projection(head_s)  # (d_s, d_t)
        s_hidden_all = s_out.last_hidden
        s_hidden_all = s_hidden_all.reshape(-1, s_hidden_all.shape[-1])  # (batch·n, d_s)

        # teacher side first: the teacher's argmax decides which aligned pairs are kept
        teacher_entropy = None
        if teacher_w is not None:  # fused: teacher logits only chunk by chunk, at the aligned candidates
            teacher_w = teacher_w.detach()
            s2t_pos, aligned = self.align(inputs.student, inputs.teacher)
            c_s_rows, c_t_rows = self.candidate_rows(inputs, s2t_pos)  # (C,)
            c_hidden = s_hidden_all.index_select(0, c_s_rows)  # (C, d_s)
            rows = fused_head_kd(
                (c_hidden.to(s2t.dtype) @ s2t), teacher_w, t_out.hidden_at(c_t_rows).detach(), teacher_w,
                vocab_size=v_t, statistics=("target_argmax", "target_entropy") if want_stats else ("target_argmax",),
                **kd,
            )
            with torch.no_grad():
                c_mapped = self.map_to_student(rows.target_argmax)  # (C,)
                mapped = torch.full((inputs.teacher.labels.numel(),), -1, dtype=c_mapped.dtype,
                                    device=c_mapped.device)
                mapped = mapped.index_copy(0, c_t_rows, c_mapped).view(inputs.teacher.labels.shape)
                kept = c_mapped.ge(0).nonzero().squeeze(1)  # candidates kept, in student order
            pairs = self.pairs_from_mapped(inputs, s2t_pos, aligned, mapped)
            s2t_div = rows.divergence.index_select(0, kept)  # (P,)
            if want_stats:
                teacher_entropy = rows.target_entropy.index_select(0, kept)
            t_logits = t_index = None
        else:
            t_logits, t_index = t_out.label_logits(inputs.teacher)  # the head runs at the label rows only
            t_logits = t_logits.detach()
            pairs = self.aligned_pairs(inputs, t_logits, t_index)
        s_rows, t_rows = pairs.student_rows, pairs.teacher_rows
        if teacher_w is None:  # teacher space: student states through the head-derived projector
            s_hidden = s_hidden_all.index_select(0, s_rows)  # (P, d_s)
            head_t = t_out.output_head_weight()[:v_t].detach()  # (V_t, d_t)
            s2t_logits = F.linear((s_hidden.to(s2t.dtype) @ s2t).to(head_t.dtype), head_t)  # (P, V_t)
            s2t_div = divergence(s2t_logits, t_logits[:, :v_t], self.kd_objective, opts.kd_temperature,
                                 teacher_rows=t_index.index_select(0, t_rows), skew_lambda=opts.skew_lambda,
                                 akl_alpha=opts.akl_alpha)  # (P,)

        # student space: projected teacher states at the kept pairs
        t_hidden = t_out.last_hidden.detach()
        t_hidden = t_hidden.reshape(-1, t_hidden.shape[-1]).index_select(0, t_rows)  # (P, d_t)
        t2s_hidden = self.t2s(t_hidden.to(self.t2s.weight.dtype))  # (P, d_s)
        student_entropy = t2s_peak = None
        if head_w is not None:  # fused: z_s and t2s_logits only chunk by chunk inside the op
            labels = inputs.student.labels.reshape(-1)
            rows = fused_head_kd(
                s_out.hidden_at(s_rows), head_w, t2s_hidden, head_w.detach(), vocab_size=v_s,
                pred_labels=labels.index_select(0, s_rows), target_labels=pairs.targets,
                statistics=("target_argmax", "pred_entropy", "target_peak") if want_stats else ("target_argmax",),
                **kd,
            )
            t2s_ce, t2s_div, student_entropy, t2s_peak = rows.target_ce.sum(), rows.divergence, rows.pred_entropy, \
                rows.target_peak
            agreement = rows.target_argmax.eq(pairs.targets)  # (P,)
            ce = rows.pred_ce.sum()  # CE at the kept pairs, then at the other label positions
            rest = (inputs.student.label_mask & ~pairs.student_mask).reshape(-1).nonzero().squeeze(1)
            if rest.numel():
                ce = ce + fused_head_kd(s_out.hidden_at(rest), head_w, vocab_size=v_s, divergence=None,
                                        pred_labels=labels.index_select(0, rest)).pred_ce.sum()
            s_logits = s_index = t2s_logits = None
        else:
            s_logits, s_index = s_out.label_logits(inputs.student)  # the head runs at the label rows only
            ce = label_cross_entropy_sum(s_logits, inputs.student, v_s)
            t2s_logits = F.linear(t2s_hidden.to(head_s.dtype), head_s)  # (P, V_s)
            t2s_ce = F.cross_entropy(t2s_logits.to(compute_dtype(t2s_logits)), pairs.targets, reduction="sum")
            with torch.no_grad():
                agreement = t2s_logits.argmax(-1).eq(pairs.targets)  # (P,)
            t2s_div = divergence(s_logits[:, :v_s], t2s_logits.detach(), self.kd_objective, opts.kd_temperature,
                                 student_rows=s_index.index_select(0, s_rows), skew_lambda=opts.skew_lambda,
                                 akl_alpha=opts.akl_alpha)  # (P,)

        with torch.no_grad():
            valid = max(1, int(inputs.student.label_mask.sum()))
            count = max(1, s_rows.numel())
            stats = {"aligned_fraction": torch.tensor(pairs.aligned / valid),
                     "kept_fraction": torch.tensor(s_rows.numel() / valid),
                     "t2s_agreement": agreement.float().sum() / count}
        return V2Terms(
            ce=ce, t2s_ce=t2s_ce, t2s_div=t2s_div, s2t_div=s2t_div, t2s_mask=agreement, t2s_logits=t2s_logits,
            student_rows=s_rows, teacher_rows=t_rows, student_mask=pairs.student_mask, teacher_mask=pairs.teacher_mask,
            student_logits=s_logits, teacher_logits=t_logits, student_vocab=v_s, teacher_vocab=v_t,
            student_index=s_index, teacher_index=t_index, stats=stats, pairs=pairs, student_entropy=student_entropy,
            t2s_peak=t2s_peak, teacher_entropy=teacher_entropy,
        )

    def dtw_teacher_hidden(self, inputs: DistillationInputs, terms: V2Terms) -> torch.Tensor:
        """t2s(h_t): DSKDv2's t2s has no bias, so this equals t2s(h_t / std(h_t)) in cosine (`dtw_hidden_input`
        makes no difference here)."""
        return project(self.t2s, inputs.teacher_out.last_hidden.detach())  # (batch, m, d_s)

    def dtw_band_attention(self, inputs: DistillationInputs, terms: V2Terms) -> torch.Tensor:
        """Pseudo-attention from the exact alignment (`alignment_attention`): DSKDv2 has no cross-model attention."""
        return alignment_attention(terms.pairs.partner, inputs.student.label_mask, inputs.teacher.label_mask)
