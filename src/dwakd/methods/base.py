"""The one interface every distillation method implements, and the objects it receives.

Data flows one way: a dual-tokenized batch -> teacher forward (no grad) + student forward ->
`DistillationMethod.forward(DistillationInputs)` -> `LossOutput(loss, parts)` -> Trainer steps.

Conventions (SPEC §1–§2):
- Labels are already shifted: `labels[b, i]` is the token predicted at position i, -100 where ignored
  (prompt and padding). Only response tokens + EOS carry labels.
- Every per-token loss is a *sum* over tokens divided by `inputs.num_items`, the number of student
  label tokens in the global batch (all accumulation steps and ranks). Teacher-side sums use the same count.
- Offsets are character spans into the full text (prompt + response); (-1, -1) for padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class TokenView:
    """One tokenizer's view of a batch. Shapes: (batch, length) and offsets (batch, length, 2)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    input_offsets: torch.Tensor
    label_offsets: torch.Tensor

    @property
    def label_mask(self) -> torch.Tensor:
        """Bool (batch, length): positions whose next token is a response token (m_s / m_t of SPEC)."""
        return self.labels.ne(-100)


@dataclass
class ModelView:
    """What a method may read from one model's forward pass and weights."""

    logits: torch.Tensor  # (batch, length, rows) — rows may exceed the tokenizer's vocab (SPEC §1)
    hidden_states: tuple[torch.Tensor, ...] | None  # embeddings output first, final (post-norm) layer last
    model: nn.Module  # the (possibly PEFT-wrapped) causal LM, for embedding tables and heads
    vocab_size: int  # number of real tokenizer tokens; logits[..., vocab_size:] are padding rows

    @property
    def last_hidden(self) -> torch.Tensor:
        """(batch, length, hidden): the final layer after the final norm."""
        if self.hidden_states is None:
            raise RuntimeError("this method needs hidden states; set needs_hidden_states = True")
        return self.hidden_states[-1]

    @property
    def vocab_logits(self) -> torch.Tensor:
        """Logits restricted to real tokens (padding rows of the head sliced off)."""
        return self.logits[..., : self.vocab_size]

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def output_head_weight(self) -> torch.Tensor:
        """(rows, hidden) weight of the LM head."""
        return self.model.get_output_embeddings().weight


@dataclass
class DistillationInputs:
    """Everything a method needs for one micro-batch."""

    student: TokenView
    teacher: TokenView | None
    student_out: ModelView
    teacher_out: ModelView | None
    num_items: torch.Tensor  # scalar: student label tokens in the global batch
    progress: float = 0.0  # fraction of training done, in [0, 1] (for schedules such as γ annealing)


@dataclass
class LossOutput:
    """The loss to back-propagate, named loss parts and statistics to log.

    `parts` are loss terms normalised like the loss (they add up over micro-batches of one step);
    `stats` are per-micro-batch means (mean weights, accuracies) that are averaged, not added.
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor | float] = field(default_factory=dict)
    stats: dict[str, torch.Tensor | float] = field(default_factory=dict)


@dataclass
class MethodContext:
    """What a method may use when it is built: configs and tokenizers of both sides, models for init."""

    student_config: Any
    teacher_config: Any | None
    student_tokenizer: Any
    teacher_tokenizer: Any | None
    student_model: nn.Module | None = None
    teacher_model: nn.Module | None = None
    cache_dir: str | None = None


@dataclass
class MethodOptions:
    """Base options shared by all methods; each method subclasses this dataclass with its own knobs."""

    kd_rate: float = 0.5  # loss = (1 - kd_rate) * CE + kd_rate * KD (SPEC §2)
    kd_temperature: float = 2.0  # τ


class DistillationMethod(nn.Module):
    """Base class: a method owns its trainable modules (projectors) and turns model outputs into a loss.

    Subclasses set `name`, `Options`, the `needs_*` flags, and implement `compute_loss`.
    Register with `@register_method`.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    needs_teacher: ClassVar[bool] = True
    needs_hidden_states: ClassVar[bool] = False
    needs_teacher_hidden_states: ClassVar[bool] | None = None  # None: same as needs_hidden_states

    def __init__(self, options: MethodOptions, context: MethodContext):
        super().__init__()
        self.options = options
        self.context = context

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls.Options)]

    def forward(self, inputs: DistillationInputs) -> LossOutput:  # noqa: D401
        return self.compute_loss(inputs)

    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        raise NotImplementedError

    def state_to_save(self) -> dict[str, torch.Tensor]:
        """Tensors saved with each checkpoint (default: this module's state dict)."""
        return self.state_dict()

    def extra_repr(self) -> str:
        return f"name={self.name!r}"
