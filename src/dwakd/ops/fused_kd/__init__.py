"""Fused LM head + KL-family divergence (per-row divergence, CE and τ = 1 statistics from hidden states + heads).

`fused_head_kd(pred_hidden, pred_weight, target_hidden, target_weight, vocab_size=..., divergence=...)` never
holds a (rows × V) tensor for all rows; `head_kd_reference` is the dense plain-PyTorch ground truth.
`fused_head_sorted_l1` does the same for ULD's sorted-probability L1 (`sorted_l1_reference` its ground truth),
`fused_head_label_log_probs` for ALM's log p(label) and space log-mass (`head_label_log_probs_reference`);
`head_entropy`, `head_topk` and `gathered_head_logits` are CDM's head terms (`head_columns`, references beside them in
`reference`).
"""

from dwakd.ops.fused_kd.chunk_math import DIVERGENCES
from dwakd.ops.fused_kd.functional import (
    CHUNK_ELEMENTS,
    STATISTICS,
    FusedKDRows,
    fused_head_kd,
)
from dwakd.ops.fused_kd.head_columns import gathered_head_logits, head_entropy, head_topk
from dwakd.ops.fused_kd.label_log_probs import fused_head_label_log_probs
from dwakd.ops.fused_kd.reference import head_kd_reference, head_label_log_probs_reference, sorted_l1_reference
from dwakd.ops.fused_kd.sorted_l1 import fused_head_sorted_l1

__all__ = ["CHUNK_ELEMENTS", "DIVERGENCES", "STATISTICS", "FusedKDRows", "fused_head_kd", "fused_head_label_log_probs",
           "fused_head_sorted_l1", "gathered_head_logits", "head_entropy", "head_kd_reference",
           "head_label_log_probs_reference", "head_topk", "sorted_l1_reference"]
