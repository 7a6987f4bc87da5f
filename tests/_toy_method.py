"""A test-only distillation method with a projector (checkpoint, resume and hostile-input tests share it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from dwakd.methods import DistillationMethod, LossOutput, MethodOptions, register_method
from dwakd.modules.projectors import model_dims


@dataclass
class ToyOptions(MethodOptions):
    nan_at_call: int = -1  # return a NaN part on this call (for the non-finite tests)


@register_method
class ToyProjectorKD(DistillationMethod):
    """Test-only method: CE + MSE between pooled student hidden states and projected pooled teacher states."""

    name = "toy-projector-test"
    Options = ToyOptions
    needs_hidden_states = True

    def __init__(self, options, context):
        super().__init__(options, context)
        self.proj = nn.Linear(model_dims(context.teacher_config).hidden, model_dims(context.student_config).hidden)
        self.calls = 0

    def compute_loss(self, inputs):
        self.calls += 1
        logits = inputs.student_out.logits  # dense on purpose: this method exercises the dense-logits path
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), inputs.student.labels.reshape(-1),
                             ignore_index=-100, reduction="sum") / inputs.num_items
        s_mask = inputs.student.label_mask.unsqueeze(-1).float()
        t_mask = inputs.teacher.label_mask.unsqueeze(-1).float()
        s = (inputs.student_out.last_hidden * s_mask).sum(1) / s_mask.sum(1)
        t = (inputs.teacher_out.last_hidden * t_mask).sum(1) / t_mask.sum(1)
        mse = ((s - self.proj(t)) ** 2).sum() / inputs.num_items
        if self.calls == self.options.nan_at_call:
            mse = mse * float("nan")
        return LossOutput(ce + mse, {"ce": ce.detach(), "mse": mse.detach()}, {"mean_norm": s.norm(dim=-1).mean()})
