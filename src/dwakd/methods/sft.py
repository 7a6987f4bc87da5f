"""SFT: cross-entropy on response tokens only (docs/methods.md#6-baselines). Also how a teacher is fine-tuned first."""

from __future__ import annotations

from dataclasses import dataclass

from dwakd.methods.base import DistillationInputs, DistillationMethod, LossOutput, MethodOptions, check_choice
from dwakd.methods.registry import register_method
from dwakd.modules.cross_entropy import student_cross_entropy_sum
from dwakd.modules.head_fusion import HEAD_FUSIONS


@dataclass
class SFTOptions(MethodOptions):
    """SFT reads only `head_fusion` (the KD options it inherits are unused)."""

    # fused: LM head + CE in one chunked op, no (rows × V) logits | dense: F.linear logits
    # | auto: fused on a GPU or under bf16 autocast, else dense
    head_fusion: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("head_fusion", self.head_fusion, HEAD_FUSIONS)


@register_method
class SFT(DistillationMethod):
    """Plain supervised fine-tuning of the student; no teacher is loaded."""

    name = "sft"
    title = "SFT"
    Options = SFTOptions
    needs_teacher = False

    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        ce_sum = student_cross_entropy_sum(inputs.student_out, inputs.student, self.options.head_fusion)
        ce = ce_sum / inputs.num_items
        return LossOutput(ce, {"ce": ce.detach()})
