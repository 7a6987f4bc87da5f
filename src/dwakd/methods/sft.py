"""SFT: cross-entropy on response tokens only (SPEC §6). Also how a teacher is fine-tuned first."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dwakd.methods.base import DistillationInputs, DistillationMethod, LossOutput, ModelView, TokenView
from dwakd.methods.registry import register_method


def token_cross_entropy_sum(logits: torch.Tensor, view: TokenView, vocab_size: int | None = None) -> torch.Tensor:
    """Sum over label tokens of −log p(label), in fp32; padding rows of the head excluded when `vocab_size` is set."""
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), view.labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


def response_cross_entropy_sum(model_view: ModelView, view: TokenView) -> torch.Tensor:
    """Like `token_cross_entropy_sum`, but the LM head runs only at the label rows (see `ModelView.logits_at`)."""
    rows = view.label_mask.reshape(-1).nonzero().squeeze(1)  # (positions,)
    logits = model_view.logits_at(rows)[:, : model_view.vocab_size]  # (positions, V)
    return F.cross_entropy(logits.float(), view.labels.reshape(-1).index_select(0, rows), reduction="sum")


@register_method
class SFT(DistillationMethod):
    """Plain supervised fine-tuning of the student; no teacher is loaded."""

    name = "sft"
    needs_teacher = False

    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        ce = response_cross_entropy_sum(inputs.student_out, inputs.student) / inputs.num_items
        return LossOutput(ce, {"ce": ce.detach()})
