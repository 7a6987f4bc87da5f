"""The shared skeleton of the dual-space KD methods: DSKD-CMA (`dskd`), DSKDv2 (`dskdv2`) and their DWA-KD versions.

A host computes one dual-space pass (`dual_space_terms` -> `DualSpaceTerms`: CE, t2s_ce and the per-row divergences
t2s_div and s2t_div); this base scales the divergences (`kd_scales`), normalises every sum by the global student
token count and assembles

    loss = w_ce·CE + w_kd·(t2s_ce + Σ scale_i·t2s_div_i + Σ scale'_j·s2t_div_j)  [+ Σ extra]  [+ λ_dtw·(D_hid + D_emb)]

A DWA-KD version of a host only attaches `DWAComponent` (`attach_dwa`) and says where its teacher sequence and band
come from (`dtw_teacher_hidden`, `dtw_band_attention`); weights, Soft-DTW, loss weights and γ live in the component.
A method that adds terms of its own to a host (DSKD-CMA-GA's key–query loss, MTA's trajectory loss) returns them
from `extra_losses`.
See docs/methods.md#4-dskd-cma and #5-dwa-kd.
"""

from __future__ import annotations

from typing import Any

import torch

from dwakd.methods.base import DistillationInputs, DistillationMethod, LossOutput, MethodContext, MethodOptions
from dwakd.modules.dual_space import DualSpaceTerms
from dwakd.modules.dwa import DWAComponent
from dwakd.modules.head_fusion import use_fused_heads
from dwakd.modules.projectors import model_dims


class DualSpaceMethod(DistillationMethod):
    """Base of the dual-space methods; subclasses implement `dual_space_terms` (and the DTW hooks if DWA-KD)."""

    needs_teacher = True
    needs_hidden_states = True

    def __init__(self, options: MethodOptions, context: MethodContext):
        super().__init__(options, context)
        if context.teacher_config is None:
            raise ValueError(f"method {self.name!r} needs a teacher: set `teacher:` in the config")
        self.dwa: DWAComponent | None = None

    def attach_dwa(self, context: MethodContext) -> None:
        """Turn this host into its DWA-KD version (call after the host's own projectors are built)."""
        self.dwa = DWAComponent(self.options, model_dims(context.student_config), model_dims(context.teacher_config))

    def fused_heads(self, device: torch.device) -> bool:
        """Whether the KD terms use the fused LM head + divergence op where the model views allow it
        (`head_fusion: fused`, or `auto` on a GPU or under bf16 autocast); otherwise dense logits (`dense`, the plain
        reference path; `auto` on a CPU in fp32, see `dwakd.modules.head_fusion`)."""
        return use_fused_heads(getattr(self.options, "head_fusion", "dense"), device)

    def token_statistics(self) -> bool:
        """Whether the fused path must return the τ = 1 statistics DWA-KD's token weights read (entropies, gate)."""
        return self.dwa is not None and bool(self.dwa.options.token_weights)

    # ---- hooks -------------------------------------------------------------------------------------------------
    def align_spaces(self, inputs: DistillationInputs) -> Any:
        """The host's alignment of the two sequences, made before its vocabulary-sized terms and handed to
        `dual_space_terms` (DSKD-CMA: the cross-model attention); None where the host aligns inside that hook."""
        return None

    def dual_space_terms(self, inputs: DistillationInputs, alignment: Any) -> DualSpaceTerms:
        """One dual-space pass on `align_spaces`' result: sums and per-row divergences before scaling and
        normalisation."""
        raise NotImplementedError

    def recomputed_dtw_loss(self, inputs: DistillationInputs, alignment: Any, gamma: float
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """DWA-KD's weighted Soft-DTW term and its parts, built from the alignment before the vocabulary terms and
        recomputed in backward (`DWAComponent.recomputed_dtw_loss`: no memory at the step's peak), where the host
        can feed them only tensors its own graph keeps; None: `compute_loss` builds them after the vocabulary terms
        instead (as it does without asking with `dtw_recompute: false`)."""
        return None

    def extra_losses(self, inputs: DistillationInputs, terms: DualSpaceTerms) -> dict[str, tuple[torch.Tensor, float]]:
        """Further loss terms of a method built on a host: name -> (value already normalised, weight in the loss).

        Each is logged as a part under its name (weight 0: logged only); a subclass may add statistics to
        `terms.stats`.
        """
        return {}

    def dtw_teacher_hidden(self, inputs: DistillationInputs, terms: DualSpaceTerms) -> torch.Tensor:
        """(batch, m, d_s) teacher final states in student space for the hidden-state Soft-DTW term."""
        raise NotImplementedError(f"{type(self).__name__} has no hidden-state Soft-DTW input")

    def dtw_band_attention(self, inputs: DistillationInputs, terms: DualSpaceTerms) -> torch.Tensor:
        """(batch, n, m) student→teacher attention the Soft-DTW band is read from."""
        raise NotImplementedError(f"{type(self).__name__} has no band source")

    # ---- shared assembly -----------------------------------------------------------------------------------------
    def kd_scales(self, inputs: DistillationInputs, terms: DualSpaceTerms) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale per student-space row of t2s_div and per teacher-space row of s2t_div (None = 1).

        DWA-KD with token weights on: its weights. Otherwise the host's t2s mask on t2s_div, s2t_div unscaled.
        Either way t2s_div ramps up over the first `kd_warmup_steps` steps when that option is set.
        """
        if self.dwa is not None and self.dwa.options.token_weights:
            t2s_scale, s2t_scale = self.dwa.kd_scales(terms)
        else:
            t2s_scale, s2t_scale = terms.t2s_mask.float(), None
        warmup = getattr(self.options, "kd_warmup_steps", 0)
        if warmup:
            t2s_scale = t2s_scale * min(1.0, (inputs.step + 1) / warmup)
        return t2s_scale, s2t_scale

    def loss_weights(self) -> tuple[float, float]:
        """(weight of CE, weight of KD) in the total loss."""
        if self.dwa is not None:
            return self.dwa.loss_weights(self.options.kd_rate)
        return 1.0 - self.options.kd_rate, self.options.kd_rate

    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        """w_ce·CE + w_kd·(t2s_ce + t2s_kd + s2t_kd) [+ λ_dtw·ΣD], every sum divided by num_items."""
        dtw_on = self.dwa is not None and bool(self.dwa.dtw_layers())
        alignment = self.align_spaces(inputs)
        gamma = self.dwa.gamma_at(inputs.progress, inputs.step) if dtw_on else None
        recompute = dtw_on and self.dwa.options.dtw_recompute  # false: the terms once, after the vocabulary terms
        dtw_loss = self.recomputed_dtw_loss(inputs, alignment, gamma) if recompute else None
        student_seqs = None
        if dtw_on and dtw_loss is None:  # before the vocabulary terms: see `DWAComponent.student_sequences`
            student_seqs = self.dwa.student_sequences(inputs)
        terms = self.dual_space_terms(inputs, alignment)
        t2s_scale, s2t_scale = self.kd_scales(inputs, terms)
        t2s_kd = (terms.t2s_div * t2s_scale).sum()
        s2t_kd = terms.s2t_div.sum() if s2t_scale is None else (terms.s2t_div * s2t_scale).sum()
        n = inputs.num_items
        ce, t2s_ce, t2s_kd, s2t_kd = terms.ce / n, terms.t2s_ce / n, t2s_kd / n, s2t_kd / n
        kd = t2s_ce + t2s_kd + s2t_kd
        w_ce, w_kd = self.loss_weights()
        loss = w_ce * ce + w_kd * kd
        parts = {"ce": ce, "t2s_ce": t2s_ce, "t2s_kd": t2s_kd, "s2t_kd": s2t_kd, "kd": kd}
        for name, (value, weight) in self.extra_losses(inputs, terms).items():
            if weight:  # weight 0: logged only
                loss = loss + weight * value
            parts[name] = value
        stats = terms.stats
        if dtw_on:  # added last: see `DWAComponent.recomputed_dtw_loss`
            if dtw_loss is None:
                attention = self.dtw_band_attention(inputs, terms) if self.dwa.options.dtw == "banded" else None
                dtw_loss = self.dwa.dtw_loss(self.dwa.dtw_sums(
                    inputs, student_seqs, lambda: self.dtw_teacher_hidden(inputs, terms), attention, gamma), n)
            dtw_term, dtw_parts = dtw_loss
            loss = loss + dtw_term
            parts.update(dtw_parts)
            stats["dtw_gamma"] = torch.tensor(gamma)
        return LossOutput(loss, {k: v.detach() for k, v in parts.items()}, stats)
