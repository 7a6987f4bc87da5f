"""Cross-entropy sums over response tokens, shared by every method that trains the student on labels."""

from __future__ import annotations

import torch

from dwakd.interface import ModelView, TokenView, label_rows
from dwakd.modules.head_fusion import use_fused_heads
from dwakd.ops.fused_kd import fused_head_kd
from dwakd.ops.row_ce import label_ce_rows


def label_cross_entropy_sum(label_logits: torch.Tensor, view: TokenView, vocab_size: int) -> torch.Tensor:
    """Σ −log p(label) from logits already gathered at the label rows (`ModelView.label_logits`), in fp32
    (`dwakd.ops.row_ce`: one numba pass each way on fp32 CPU logits, `F.cross_entropy` elsewhere)."""
    targets = view.labels[view.label_mask]  # (K,) row-major, the order of the gathered rows
    return label_ce_rows(label_logits[:, :vocab_size], targets)[0].sum()


def student_cross_entropy_sum(out: ModelView, view: TokenView, head_fusion: str = "dense") -> torch.Tensor:
    """Σ −log p(label) over the label rows of `view` for a method that reads no other logits of this side.

    With `head_fusion` resolving to fused (`dwakd.modules.head_fusion`) and a plain linear head on the view, the
    LM head and the CE run as one chunked op (`fused_head_kd`, recomputing the logits in backward): no (K × V)
    logits or logit gradient for the whole batch. Otherwise the dense path: logits at the label rows, CE in fp32.
    """
    weight = out.linear_head_weight() if use_fused_heads(head_fusion, view.labels.device) else None
    if weight is None:
        logits, _ = out.label_logits(view)  # the head runs at the label rows only
        return label_cross_entropy_sum(logits, view, out.vocab_size)
    rows, _ = label_rows(view)  # (K,) flat positions, row-major
    labels = view.labels.reshape(-1).index_select(0, rows)
    return fused_head_kd(out.hidden_at(rows), weight, vocab_size=out.vocab_size, divergence=None,
                         pred_labels=labels).pred_ce.sum()
