"""DWA-KD (SPEC §5; Vu et al., EACL Findings 2026): DSKD-CMA + dual-space token weights + banded Soft-DTW.

    L = λ_ce·CE + λ_kd·(t2s_ce + Σ_i w_i·D(t2s → z_s)_i + Σ_j u_j·KL(z_t → s2t)_j) + λ_dtw·(D_hid + D_emb)

every sum divided by `inputs.num_items`. Token level (paper §3.2): w_i = Ĥ_s(i)·g_i and u_j = 1 − Ĥ_t(j), both
rescaled per sequence to sum to its valid-token count (`dwakd.modules.token_weights`). With `token_weights` off the
t2s/s2t terms are DSKD's (argmax-correctness mask on t2s_kd, unweighted s2t_kd). Sequence level (paper §3.3):
Soft-DTW divergence over the response positions of
    hidden:     h_s  vs  t2s(h_t / std(h_t))            (t2s shared with the cross-model attention)
    embedding:  E_s(y_s) (not detached)  vs  P_emb(E_t(y_t))
with the attention-informed soft band on the cross term when `dtw: banded` (`dwakd.modules.band`).
γ anneals linearly from `gamma` (2.0) to `gamma_end` (0.8) with training progress, or stays at `gamma`.

Presets (paper Table 3): dwakd-ew (weights, no DTW), dwakd-dtw (DTW without band, no weights),
dwakd-bdtw (banded DTW, no weights), dwakd-nogate (full method with g ≡ 1).

Choices where SPEC / the paper are silent are listed in the docstrings of the modules used; those specific to
this method: λ_ce and λ_kd default to 1 − kd_rate and kd_rate (both 0.5), so one `kd_rate` knob keeps the DSKD
reading; the gate is read from t2s_logits at temperature 1 and carries no gradient; weights are applied to the
KD terms only (t2s_ce stays unweighted, as in the paper's Eq. 16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dwakd.methods.base import DistillationInputs, LossOutput, MethodContext
from dwakd.methods.dskd import DSKD, DSKDOptions, DualSpaceTerms
from dwakd.methods.registry import register_method, register_preset
from dwakd.modules.cross_attention import lookup, project
from dwakd.modules.dtw import response_dtw_divergence
from dwakd.modules.token_weights import (
    peak_probability,
    student_token_weights,
    teacher_token_weights,
)

DTW_MODES = ("off", "plain", "banded")
DTW_LAYERS = ("hidden", "embedding")
GAMMA_SCHEDULES = ("linear", "constant")


@dataclass
class DWAKDOptions(DSKDOptions):
    """Every knob of SPEC §5; defaults are the paper's full method."""

    token_weights: bool = True  # dual-space entropy weights; False: DSKD's argmax-correctness mask, unweighted s2t
    gate: bool = True  # g_i = peak teacher confidence in student space; False: g_i ≡ 1 ("w/o gate")
    dtw: str = "banded"  # off | plain | banded
    dtw_layers: Sequence[str] = ("hidden", "embedding")  # which sequences get a Soft-DTW term
    band_base: float = 5.0  # base band half-width, in tokens
    band_sensitivity: float = 2.0  # κ: width grows by κ·(attention entropy)
    band_blend: float = 0.7  # β: centre = β·soft centre + (1 − β)·linear diagonal
    band_penalty: float = 1.0  # ρ: cost added outside the band
    gamma: float = 2.0  # Soft-DTW γ (start value when annealed)
    gamma_end: float = 0.8  # γ at the end of training (linear schedule)
    gamma_schedule: str = "linear"  # linear | constant
    ce_weight: float | None = None  # λ_ce; None: 1 − kd_rate
    kd_weight: float | None = None  # λ_kd; None: kd_rate
    dtw_weight: float = 0.2  # λ_dtw
    dtw_impl: str = "auto"  # Soft-DTW backend passed to dwakd.ops.soft_dtw


@register_method
class DWAKD(DSKD):
    """DWA-KD: DSKD-CMA with entropy/confidence token weights and Soft-DTW on final hidden states and embeddings."""

    name = "dwakd"
    Options = DWAKDOptions

    def __init__(self, options: DWAKDOptions, context: MethodContext):
        if options.dtw not in DTW_MODES:
            raise ValueError(f"method_options.dtw must be one of {DTW_MODES}, got {options.dtw!r}")
        if isinstance(options.dtw_layers, str):
            options.dtw_layers = (options.dtw_layers,)
        options.dtw_layers = tuple(options.dtw_layers)
        unknown = [layer for layer in options.dtw_layers if layer not in DTW_LAYERS]
        if unknown:
            raise ValueError(f"method_options.dtw_layers: unknown {unknown}; choose from {DTW_LAYERS}")
        if options.gamma_schedule not in GAMMA_SCHEDULES:
            raise ValueError(
                f"method_options.gamma_schedule must be one of {GAMMA_SCHEDULES}, got {options.gamma_schedule!r}"
            )
        if options.dtw != "off" and not (options.gamma > 0 and options.gamma_end > 0):
            raise ValueError(f"Soft-DTW needs gamma > 0 and gamma_end > 0, got {options.gamma} and {options.gamma_end}")
        super().__init__(options, context)

    def dtw_layers(self) -> tuple[str, ...]:
        """The sequences that get a Soft-DTW term (empty when DTW is off)."""
        return () if self.options.dtw == "off" else tuple(self.options.dtw_layers)

    def uses_embedding_projector(self) -> bool:
        """P_emb exists only when the embedding Soft-DTW term is on."""
        return "embedding" in self.dtw_layers()

    def gamma_at(self, progress: float) -> float:
        """Soft-DTW γ at a training progress in [0, 1]: linear from `gamma` to `gamma_end`, or constant."""
        opts: DWAKDOptions = self.options
        if opts.gamma_schedule == "constant":
            return float(opts.gamma)
        t = min(1.0, max(0.0, float(progress)))
        return float(opts.gamma + (opts.gamma_end - opts.gamma) * t)

    def loss_weights(self) -> tuple[float, float]:
        """(λ_ce, λ_kd); unset ones follow kd_rate like DSKD."""
        opts: DWAKDOptions = self.options
        w_ce, w_kd = super().loss_weights()
        w_ce = w_ce if opts.ce_weight is None else opts.ce_weight
        w_kd = w_kd if opts.kd_weight is None else opts.kd_weight
        return w_ce, w_kd

    def kd_scales(
        self, inputs: DistillationInputs, terms: DualSpaceTerms, student_rows: torch.Tensor, teacher_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """w_i at valid student positions and u_j at valid teacher positions (DSKD's mask when weights are off)."""
        opts: DWAKDOptions = self.options
        if not opts.token_weights:
            return super().kd_scales(inputs, terms, student_rows, teacher_rows)
        s_out, t_out = inputs.student_out, inputs.teacher_out
        gate = peak_probability(terms.t2s_logits.detach()) if opts.gate else None  # (P,)
        # the logits the dual-space terms already gathered at the valid rows (no second pass over the heads)
        w = student_token_weights(terms.student_logits, terms.cma.student_mask, s_out.vocab_size, gate)
        u = teacher_token_weights(terms.teacher_logits, terms.cma.teacher_mask, t_out.vocab_size)
        with torch.no_grad():
            terms.stats["student_weight_mean"] = _masked_mean(w.raw, terms.cma.student_mask)
            terms.stats["teacher_weight_mean"] = _masked_mean(u.raw, terms.cma.teacher_mask)
            if gate is not None:
                terms.stats["gate_mean"] = gate.mean() if gate.numel() else gate.new_zeros(())
        student_scale = w.weights.reshape(-1).index_select(0, student_rows)  # (P,)
        teacher_scale = u.weights.reshape(-1).index_select(0, teacher_rows)  # (Q,)
        return student_scale, teacher_scale

    def dtw_terms(self, inputs: DistillationInputs, terms: DualSpaceTerms, gamma: float) -> dict[str, torch.Tensor]:
        """Soft-DTW divergence summed over the batch for each enabled layer: {"dtw_hidden": …, "dtw_embedding": …}."""
        opts: DWAKDOptions = self.options
        cma = terms.cma
        attention = cma.t2s_attn if opts.dtw == "banded" else None
        band = dict(
            band_base=opts.band_base, band_sensitivity=opts.band_sensitivity,
            band_blend=opts.band_blend, band_penalty=opts.band_penalty, impl=opts.dtw_impl,
        )
        out: dict[str, torch.Tensor] = {}
        for layer in self.dtw_layers():
            if layer == "hidden":
                student_seq = inputs.student_out.last_hidden  # (batch, n, d_s)
                teacher_seq = project(self.projectors.t2s, cma.teacher_hidden_norm)  # (batch, m, d_s)
            else:
                student_view, teacher_view = inputs.student, inputs.teacher
                # student target embeddings keep their gradient: the embedding table learns from this term
                student_seq = lookup(inputs.student_out.input_embeddings(), student_view.labels, cma.student_mask)
                with torch.no_grad():
                    teacher_emb = lookup(inputs.teacher_out.input_embeddings(), teacher_view.labels, cma.teacher_mask)
                teacher_seq = project(self.projectors.embedding, teacher_emb.detach())  # (batch, m, e_s)
            per_sequence = response_dtw_divergence(
                student_seq, teacher_seq, cma.student_mask, cma.teacher_mask, gamma, attention, **band
            )  # (batch,)
            out[f"dtw_{layer}"] = per_sequence.sum()
        return out

    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        """λ_ce·CE + λ_kd·KD_weighted + λ_dtw·(D_hid + D_emb), every sum divided by num_items."""
        terms = self.dual_space_terms(inputs)
        loss, parts = self.dual_space_loss(terms, inputs.num_items)
        stats = terms.stats
        if self.dtw_layers():
            gamma = self.gamma_at(inputs.progress)
            dtw = {name: value / inputs.num_items for name, value in self.dtw_terms(inputs, terms, gamma).items()}
            loss = loss + self.options.dtw_weight * sum(dtw.values())
            parts.update(dtw)
            stats["dtw_gamma"] = torch.tensor(gamma)
        return LossOutput(loss, {k: v.detach() for k, v in parts.items()}, stats)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values (batch, length) over True entries of mask; 0 when there are none."""
    count = mask.sum()
    return (values * mask).sum() / count.clamp_min(1)


register_preset("dwakd-ew", DWAKD, dtw="off")
register_preset("dwakd-dtw", DWAKD, token_weights=False, dtw="plain")
register_preset("dwakd-bdtw", DWAKD, token_weights=False, dtw="banded")
register_preset("dwakd-nogate", DWAKD, gate=False)
