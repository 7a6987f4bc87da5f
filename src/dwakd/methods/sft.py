"""SFT: cross-entropy on response tokens only (SPEC §6). Also how a teacher is fine-tuned first."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dwakd.methods.base import DistillationInputs, DistillationMethod, LossOutput, TokenView
from dwakd.methods.registry import register_method


def token_cross_entropy_sum(logits: torch.Tensor, view: TokenView, vocab_size: int | None = None) -> torch.Tensor:
    """Sum over label tokens of −log p(label), in fp32; padding rows of the head excluded when `vocab_size` is set."""
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), view.labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


def label_cross_entropy_sum(label_logits: torch.Tensor, view: TokenView, vocab_size: int) -> torch.Tensor:
    """Σ −log p(label) from logits already gathered at the label rows (`ModelView.label_logits`), in fp32."""
    targets = view.labels[view.label_mask]  # (K,) row-major, the order of the gathered rows
    return F.cross_entropy(label_logits[:, :vocab_size].float(), targets, reduction="sum")


@register_method
class SFT(DistillationMethod):
    """Plain supervised fine-tuning of the student; no teacher is loaded."""

    name = "sft"
    needs_teacher = False

    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        s_out = inputs.student_out
        logits, _ = s_out.label_logits(inputs.student)  # the head runs at the label rows only
        ce = label_cross_entropy_sum(logits, inputs.student, s_out.vocab_size) / inputs.num_items
        return LossOutput(ce, {"ce": ce.detach()})
