"""The objects a distillation method receives and returns: both token views, both models' outputs, the loss.

This module sits below `dwakd.modules` and `dwakd.methods` (both import it; it imports neither), so shared pieces
such as the cross-model attention can name these types without an upward import.

Conventions (docs/methods.md §1.2–1.3 and §2.1):
- Labels are already shifted: `labels[b, i]` is the token predicted at position i, -100 where ignored
  (prompt and padding). Only response tokens + EOS carry labels.
- Every per-token loss is a *sum* over tokens divided by `inputs.num_items`, the number of student
  label tokens in the global batch (all accumulation steps and ranks). Teacher-side sums use the same count.
- Offsets are character spans into the full text (prompt + response); (-1, -1) for padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
    # Optional per-token text units a method asked for (`DistillationMethod.text_annotator`): kind ("word",
    # "phrase", ...) -> (batch, length) int64 index of the unit that contains the input token, −1 for none.
    # Unit k of a kind is the same piece of text on the student and the teacher side.
    units: dict[str, torch.Tensor] | None = None

    @property
    def label_mask(self) -> torch.Tensor:
        """Bool (batch, length): positions whose next token is a response token.

        m_s / m_t of docs/methods.md#notation.
        """
        return self.labels.ne(-100)


def label_rows(view: TokenView) -> tuple[torch.Tensor, torch.Tensor]:
    """(K,) flat positions of `view`'s label rows, row-major, and the (batch·length,) int64 map from flat positions
    to rows of that list (−1 off the labels, which `index_select` rejects)."""
    mask = view.label_mask.reshape(-1)
    index = torch.where(mask, mask.long().cumsum(0) - 1, torch.full_like(mask, -1, dtype=torch.long))
    return mask.nonzero().squeeze(1), index


class ModelView:
    """What a method may read from one model's forward pass and weights.

    The trainer may run the model without its LM head over the whole sequence (`logits=None`, `head` and
    `last_hidden` given) so that head rows are computed only where a loss reads them: call `logits_at(rows)`
    with the flat (batch·length) positions you need. The dense `logits` property still works for any method
    (it applies the head to every position on first access), so a method that never calls `logits_at` pays
    exactly what it paid before.
    """

    def __init__(
        self,
        logits: torch.Tensor | None,
        hidden_states: tuple[torch.Tensor, ...] | None,
        model: nn.Module,
        vocab_size: int,
        head: Callable[[torch.Tensor], torch.Tensor] | None = None,
        last_hidden: torch.Tensor | None = None,
        attentions: tuple[torch.Tensor, ...] | None = None,
    ):
        if logits is None and (head is None or (last_hidden is None and not hidden_states)):
            raise ValueError("ModelView needs dense logits, or an LM head and the final hidden states")
        self._logits = logits  # (batch, length, rows) — rows may exceed the tokenizer's vocab (docs/methods.md §1.4)
        self.hidden_states = hidden_states  # embeddings output first, final (post-norm) layer last; None if unasked
        self.model = model  # the (possibly PEFT-wrapped) causal LM, for embedding tables and heads
        self.vocab_size = vocab_size  # number of real tokenizer tokens; logits[..., vocab_size:] are padding rows
        self._head = head
        self._last_hidden = last_hidden  # final hidden states for the head when hidden_states is None
        # attention probabilities per layer, (batch, heads, length, length), layer ℓ's self-attention (the one that
        # produces hidden_states[ℓ]) at index ℓ − 1; None unless the method sets `needs_attentions`
        self.attentions = attentions

    @property
    def logits(self) -> torch.Tensor:
        """(batch, length, rows) logits at every position (computed from the head on first access if needed)."""
        if self._logits is None:
            self._logits = self._head(self._head_input())
        return self._logits

    @logits.setter
    def logits(self, value: torch.Tensor) -> None:
        self._logits = value

    def _head_input(self) -> torch.Tensor:
        return self._last_hidden if self._last_hidden is not None else self.hidden_states[-1]

    def logits_at(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), head rows) logits at flat positions `rows` of the (batch, length) grid, in that order."""
        if self._logits is not None:
            return self._logits.reshape(-1, self._logits.shape[-1]).index_select(0, rows)
        hidden = self._head_input()
        return self._head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows))

    def label_logits(self, view: TokenView) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the label rows of `view` (K, head rows), row-major, and a (batch·length,) int64 map from flat
        positions to rows of it (−1 off the labels, which `index_select` rejects)."""
        rows, index = label_rows(view)
        return self.logits_at(rows), index

    def linear_head_weight(self) -> torch.Tensor | None:
        """(head rows, hidden) weight W when this view's logits are exactly `hidden_at(rows) @ Wᵀ`, else None.

        True when the trainer deferred the LM head (it checked once that the head reproduces the model's logits:
        no logit scaling or soft-capping) and the head is a plain bias-free `nn.Linear` (not a LoRA wrapper, not
        partitioned by DeepSpeed ZeRO-3).
        Fused head + loss ops (`dwakd.ops.fused_kd`) read the hidden states and this weight instead of logits;
        a view built from dense logits returns None, and its logits are used as given.
        """
        head = self._head
        if head is None or type(head) is not nn.Linear or head.bias is not None:
            return None
        if getattr(head.weight, "ds_id", None) is not None:  # DeepSpeed ZeRO-3: whole only inside the head's forward
            return None
        return head.weight

    def hidden_at(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), hidden) final hidden states (the LM head's input) at flat positions `rows`, in that order."""
        hidden = self._head_input()
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)

    @property
    def last_hidden(self) -> torch.Tensor:
        """(batch, length, hidden): the final layer after the final norm."""
        if self.hidden_states is None:
            raise RuntimeError("this method needs hidden states; set needs_hidden_states = True")
        return self.hidden_states[-1]

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
    step: int = 0  # optimizer steps done so far (for schedules counted in steps)


@dataclass
class LossOutput:
    """The loss to back-propagate, named loss parts and statistics to log.

    `parts` are loss terms normalised like the loss (they add up over micro-batches of one step);
    `stats` are per-micro-batch means (mean weights, accuracies) that are averaged, not added.
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor | float] = field(default_factory=dict)
    stats: dict[str, torch.Tensor | float] = field(default_factory=dict)
