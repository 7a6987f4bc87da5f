"""Cross-entropy sums over response tokens, in fp32, shared by every method that trains the student on labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dwakd.interface import TokenView


def label_cross_entropy_sum(label_logits: torch.Tensor, view: TokenView, vocab_size: int) -> torch.Tensor:
    """Σ −log p(label) from logits already gathered at the label rows (`ModelView.label_logits`), in fp32."""
    targets = view.labels[view.label_mask]  # (K,) row-major, the order of the gathered rows
    return F.cross_entropy(label_logits[:, :vocab_size].float(), targets, reduction="sum")
