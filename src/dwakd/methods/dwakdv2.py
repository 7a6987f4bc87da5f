"""DWA-KDv2 (SPEC §5 last line; paper Appendix D.1): DWA-KD's token weights and banded Soft-DTW on top of DSKDv2.

    L = λ_ce·CE + λ_kd·(t2s_ce + Σ_i w_i·D(t2s → z_s)_i + Σ_j u_j·D(z_t → s2t)_j) + λ_dtw·(D_hid + D_emb)

every sum divided by `inputs.num_items`, with DSKDv2's pieces (pinv-initialised t2s, head-derived s2t, exact token
alignment, teacher-argmax targets) in place of DSKD-CMA's.
- Token weights (`dwakd.modules.token_weights`, shared with DWA-KD): w_i = Ĥ_s(i)·g_i with the gate
  g_i = max softmax(t2s_logits_i), u_j = 1 − Ĥ_t(j); they replace DSKDv2's agreement mask. Choice (SPEC silent):
  the KD terms of DSKDv2 live on the kept aligned pairs only, so the weights are rescaled per sequence over
  those positions (they sum to the number of kept pairs of the sequence). With `token_weights: false` the terms
  are DSKDv2's exactly, and with DTW off as well this method *is* DSKDv2 (tested).
- Soft-DTW (`dwakd.modules.dtw.response_dtw_divergence`, shared with DWA-KD) over all response positions:
  hidden h_s vs t2s(h_t) — DSKDv2's t2s has no bias, so this equals DWA-KD's t2s(h_t / std(h_t)) in cosine;
  embedding E_s(y_s) (the table learns) vs P_emb(E_t(y_t)), P_emb a new Linear(e_t → e_s).
- The band: DSKDv2 has no cross-model attention, so the band is read from the exact alignment instead
  (choice, SPEC silent): an aligned student token "attends" one-hot to its teacher partner (centre on it, width
  `band_base`); an unaligned one attends uniformly to the teacher tokens between the partners of the nearest
  aligned tokens before and after it (centre in that gap, width base + κ·log(gap size)). `attention_band` then
  blends that centre with the diagonal (β) exactly as in DWA-KD.
γ, its schedule, λ's and every band knob are DWA-KD's options with DWA-KD's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dwakd.methods.base import DistillationInputs, LossOutput, MethodContext
from dwakd.methods.dskdv2 import DSKDv2, DSKDv2Options, DualSpaceV2Terms
from dwakd.methods.dwakd import DTW_LAYERS, DTW_MODES, DWAKD, GAMMA_SCHEDULES, DWAKDOptions
from dwakd.methods.registry import register_method
from dwakd.modules.cross_attention import lookup, project
from dwakd.modules.dtw import response_dtw_divergence
from dwakd.modules.projectors import model_dims
from dwakd.modules.token_weights import peak_probability, student_token_weights, teacher_token_weights, valid_rows


@dataclass
class DWAKDv2Options(DWAKDOptions, DSKDv2Options):
    """DWA-KD's weight/DTW/band/γ knobs together with DSKDv2's alignment and projector-initialisation knobs."""


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


@register_method
class DWAKDv2(DSKDv2):
    """DSKDv2 with DWA-KD's dual-space token weights and (banded) Soft-DTW on hidden states and embeddings."""

    name = "dwakdv2"
    Options = DWAKDv2Options

    # the same schedule and switches as DWA-KD, read from the same options
    gamma_at = DWAKD.gamma_at
    dtw_layers = DWAKD.dtw_layers

    def __init__(self, options: DWAKDv2Options, context: MethodContext):
        if options.dtw not in DTW_MODES:
            raise ValueError(f"method_options.dtw must be one of {DTW_MODES}, got {options.dtw!r}")
        options.dtw_layers = (options.dtw_layers,) if isinstance(options.dtw_layers, str) else tuple(options.dtw_layers)
        unknown = [layer for layer in options.dtw_layers if layer not in DTW_LAYERS]
        if unknown:
            raise ValueError(f"method_options.dtw_layers: unknown {unknown}; choose from {DTW_LAYERS}")
        if options.gamma_schedule not in GAMMA_SCHEDULES:
            raise ValueError(f"method_options.gamma_schedule must be one of {GAMMA_SCHEDULES}, "
                             f"got {options.gamma_schedule!r}")
        if options.dtw != "off" and not (options.gamma > 0 and options.gamma_end > 0):
            raise ValueError(f"Soft-DTW needs gamma > 0 and gamma_end > 0, got {options.gamma} and {options.gamma_end}")
        super().__init__(options, context)
        self.embedding_projector = None
        if "embedding" in self.dtw_layers():
            s_dims, t_dims = model_dims(context.student_config), model_dims(context.teacher_config)
            self.embedding_projector = nn.Linear(t_dims.embedding, s_dims.embedding)  # P_emb

    def loss_weights(self) -> tuple[float, float]:
        """(λ_ce, λ_kd); unset ones follow kd_rate like DSKDv2."""
        opts: DWAKDv2Options = self.options
        w_ce = 1.0 - opts.kd_rate if opts.ce_weight is None else opts.ce_weight
        w_kd = opts.kd_rate if opts.kd_weight is None else opts.kd_weight
        return w_ce, w_kd

    def kd_scales(
        self, inputs: DistillationInputs, terms: DualSpaceV2Terms
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """w_i per kept pair for t2s_kd and u_j for s2t_kd; DSKDv2's agreement mask when weights are off."""
        opts: DWAKDv2Options = self.options
        if not opts.token_weights:
            return super().kd_scales(inputs, terms)
        s_out, t_out, pairs = inputs.student_out, inputs.teacher_out, terms.pairs
        gate = peak_probability(terms.t2s_logits.detach()) if opts.gate else None  # (P,) in student row order
        # logits at the kept pairs, gathered from the label rows the dual-space terms computed
        s_logits = terms.student_logits.index_select(0, terms.student_index.index_select(0, pairs.student_rows))
        t_kept = valid_rows(pairs.teacher_mask)
        t_logits = terms.teacher_logits.index_select(0, terms.teacher_index.index_select(0, t_kept))
        w = student_token_weights(s_logits, pairs.student_mask, s_out.vocab_size, gate)
        u = teacher_token_weights(t_logits, pairs.teacher_mask, t_out.vocab_size)
        with torch.no_grad():
            count = max(1, pairs.student_rows.numel())
            terms.stats["student_weight_mean"] = w.raw.sum() / count
            terms.stats["teacher_weight_mean"] = u.raw.sum() / count
            if gate is not None:
                terms.stats["gate_mean"] = gate.sum() / count
        return (w.weights.reshape(-1).index_select(0, pairs.student_rows),
                u.weights.reshape(-1).index_select(0, pairs.teacher_rows))

    def dtw_terms(self, inputs: DistillationInputs, terms: DualSpaceV2Terms, gamma: float) -> dict[str, torch.Tensor]:
        """Soft-DTW divergence summed over the batch per enabled layer: {"dtw_hidden": …, "dtw_embedding": …}."""
        opts: DWAKDv2Options = self.options
        student, teacher = inputs.student, inputs.teacher
        m_s, m_t = student.label_mask, teacher.label_mask  # whole responses, not only aligned tokens
        attention = alignment_attention(terms.pairs.partner, m_s, m_t) if opts.dtw == "banded" else None
        band = dict(band_base=opts.band_base, band_sensitivity=opts.band_sensitivity, band_blend=opts.band_blend,
                    band_penalty=opts.band_penalty, impl=opts.dtw_impl)
        out: dict[str, torch.Tensor] = {}
        for layer in self.dtw_layers():
            if layer == "hidden":
                student_seq = inputs.student_out.last_hidden  # (batch, n, d_s)
                teacher_seq = project(self.t2s, inputs.teacher_out.last_hidden.detach())  # (batch, m, d_s)
            else:
                # student target embeddings keep their gradient: the embedding table learns from this term
                student_seq = lookup(inputs.student_out.input_embeddings(), student.labels, m_s)  # (batch, n, e_s)
                with torch.no_grad():
                    teacher_emb = lookup(inputs.teacher_out.input_embeddings(), teacher.labels, m_t)
                teacher_seq = project(self.embedding_projector, teacher_emb)  # (batch, m, e_s)
            per_sequence = response_dtw_divergence(student_seq, teacher_seq, m_s, m_t, gamma, attention, **band)
            out[f"dtw_{layer}"] = per_sequence.sum()
        return out

    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        """λ_ce·CE + λ_kd·KD_weighted + λ_dtw·(D_hid + D_emb), every sum divided by num_items."""
        terms = self.dual_space_terms(inputs)
        loss, parts = self.dual_space_loss(terms, inputs.num_items)
        stats = terms.stats
        if self.dtw_layers():
            gamma = self.gamma_at(inputs.progress)
            dtw = {k: v / inputs.num_items for k, v in self.dtw_terms(inputs, terms, gamma).items()}
            loss = loss + self.options.dtw_weight * sum(dtw.values())
            parts.update(dtw)
            stats["dtw_gamma"] = torch.tensor(gamma)
        return LossOutput(loss, {k: v.detach() for k, v in parts.items()}, stats)
