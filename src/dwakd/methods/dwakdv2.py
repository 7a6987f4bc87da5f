"""DWA-KDv2 (paper Appendix D.1): DWA-KD's token weights and banded Soft-DTW on top of DSKDv2.

    L = λ_ce·CE + λ_kd·(t2s_ce + Σ_i w_i·D(t2s → z_s)_i + Σ_j u_j·D(z_t → s2t)_j) + λ_dtw·(D_hid + D_emb)

every sum divided by `inputs.num_items`: the `dskdv2` host (pinv-initialised t2s, head-derived s2t, exact token
alignment, teacher-argmax targets) with the DWA-KD component (`dwakd.modules.dwa`) attached, exactly as `dwakd` is
`dskd` with it. What the host decides (docs/methods.md#5-dwa-kd, choices where the paper is silent):
- the KD terms live on the kept aligned pairs, so the weights are rescaled per sequence over those pairs and replace
  DSKDv2's agreement mask; with `token_weights: false` and DTW off this method *is* `dskdv2` (tested);
- the hidden-state Soft-DTW term compares h_s with t2s(h_t) (no bias, so equal to t2s(h_t / std(h_t)) in cosine);
- the band is read from the exact alignment (`dwakd.modules.band.alignment_attention`): an aligned student token
  attends one-hot to its partner, an unaligned one uniformly to the teacher tokens between its neighbours' partners.
"""

from __future__ import annotations

from dwakd.methods.base import MethodContext
from dwakd.methods.dskdv2 import DSKDv2, DSKDv2Options
from dwakd.methods.registry import register_method
from dwakd.modules.dwa import with_dwa_options

DWAKDv2Options = with_dwa_options(DSKDv2Options, "DWAKDv2Options")


@register_method
class DWAKDv2(DSKDv2):
    """DSKDv2 with DWA-KD's dual-space token weights and (banded) Soft-DTW on hidden states and embeddings."""

    name = "dwakdv2"
    title = "DWA-KDv2"
    Options = DWAKDv2Options

    def __init__(self, options: DWAKDv2Options, context: MethodContext):
        super().__init__(options, context)
        self.attach_dwa(context)
