"""SFT: cross-entropy on response tokens only (docs/methods.md#6-baselines). Also how a teacher is fine-tuned first."""

from __future__ import annotations

from dwakd.methods.base import DistillationInputs, DistillationMethod, LossOutput
from dwakd.methods.registry import register_method
from dwakd.modules.cross_entropy import label_cross_entropy_sum


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
