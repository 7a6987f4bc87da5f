"""DWA-KD (Vu et al., EACL Findings 2026): DSKD-CMA + dual-space token weights + banded Soft-DTW.

    L = λ_ce·CE + λ_kd·(t2s_ce + Σ_i w_i·D(t2s → z_s)_i + Σ_j u_j·KL(z_t → s2t)_j) + λ_dtw·(D_hid + D_emb)

every sum divided by `inputs.num_items`. This module is the `dskd` host with the DWA-KD component
(`dwakd.modules.dwa`) attached: the hidden-state Soft-DTW term compares h_s with t2s(h_t / std(h_t)) (t2s shared with
the cross-model attention) and the band is read from the cross-model attention. With `token_weights` and `dtw` off it
*is* `dskd` (tested bit for bit). Options: DSKD's plus `DWAOptions`; docs/methods.md#5-dwa-kd lists them all.

Presets (paper Table 3): dwakd-ew (weights, no DTW), dwakd-dtw (DTW without band, no weights), dwakd-bdtw (banded
DTW, no weights), dwakd-nogate (full method with g ≡ 1); `dwakd-ref` reproduces the public reference code's choices
where they differ from the paper (skewed reverse KL, gate applied after rescaling, a 300-step warm-up of t2s_kd,
γ annealed over 3,570 steps, hidden-state DTW on the raw teacher states).
"""

from __future__ import annotations

from dwakd.methods.base import MethodContext
from dwakd.methods.dskd import DSKD, DSKDOptions
from dwakd.methods.registry import register_method, register_preset
from dwakd.modules.dwa import with_dwa_options

DWAKDOptions = with_dwa_options(DSKDOptions, "DWAKDOptions")

REFERENCE_CODE_OPTIONS = dict(kd_objective="srkl", gate_after_rescale=True, kd_warmup_steps=300, gamma_steps=3570,
                              dtw_hidden_input="raw")


@register_method
class DWAKD(DSKD):
    """DWA-KD: DSKD-CMA with entropy/confidence token weights and Soft-DTW on final hidden states and embeddings."""

    name = "dwakd"
    title = "DWA-KD"
    Options = DWAKDOptions

    def __init__(self, options: DWAKDOptions, context: MethodContext):
        super().__init__(options, context)
        self.attach_dwa(context)


register_preset("dwakd-ew", DWAKD, title="DWA-KD w/ EW", dtw="off")
register_preset("dwakd-dtw", DWAKD, title="DWA-KD w/ DTW", token_weights=False, dtw="plain")
register_preset("dwakd-bdtw", DWAKD, title="DWA-KD w/ bDTW", token_weights=False, dtw="banded")
register_preset("dwakd-nogate", DWAKD, title="DWA-KD w/o gate", gate=False)
register_preset("dwakd-ref", DWAKD, title="DWA-KD (ref. code)", **REFERENCE_CODE_OPTIONS)
