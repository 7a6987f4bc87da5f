"""The one interface every distillation method implements, its options base class, and option checks.

Data flows one way: a dual-tokenized batch -> teacher forward (no grad) + student forward ->
`DistillationMethod.forward(DistillationInputs)` -> `LossOutput(loss, parts)` -> Trainer steps.
The objects passed in and out (`TokenView`, `ModelView`, `DistillationInputs`, `LossOutput`) live in
`dwakd.interface` and are re-exported here.

Options: each method declares a dataclass subclassing `MethodOptions`; its `__post_init__` checks every value and
raises `OptionError(name, message)`, so a bad value is reported as `method.options.NAME` when the config is read,
before any data or model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from dwakd.interface import DistillationInputs, LossOutput, ModelView, TokenView
from dwakd.options import OptionError, check_choice, check_positive, check_range

__all__ = [
    "DistillationInputs",
    "DistillationMethod",
    "LossOutput",
    "MethodContext",
    "MethodOptions",
    "ModelView",
    "OptionError",
    "TokenView",
    "check_choice",
    "check_positive",
    "check_range",
]


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

    # loss = (1 - kd_rate) * CE + kd_rate * KD (docs/methods.md#2-loss-normalisation-and-optimisation)
    kd_rate: float = 0.5
    kd_temperature: float = 2.0  # τ

    def __post_init__(self) -> None:
        check_range("kd_rate", self.kd_rate, 0.0, 1.0)
        check_positive("kd_temperature", self.kd_temperature)


class DistillationMethod(nn.Module):
    """Base class: a method owns its trainable modules (projectors) and turns model outputs into a loss.

    Subclasses set `name`, `Options`, the `needs_*` flags, and implement `compute_loss`.
    Register with `@register_method`. The `MethodContext` is for building only; a method keeps what it needs.
    Optional hooks: `text_annotator` (per-token text units computed once at tokenization time) and
    `param_groups` (optimizer settings for some of the method's own parameters).

    What a method reads of the teacher is declared too, so a teacher cache (docs/teacher-cache.md) can serve it:
    `teacher_layers` (indices into `hidden_states` beyond the final one), `teacher_distribution` and
    `teacher_temperature(options)`. The defaults match every method that reads softmax distributions of the teacher
    at its `kd_temperature` and no intermediate layer.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # label in tables and plots, as the papers write it (empty: `name`)
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    needs_teacher: ClassVar[bool] = True
    needs_hidden_states: ClassVar[bool] = False
    needs_teacher_hidden_states: ClassVar[bool] | None = None  # None: same as needs_hidden_states
    # attention probabilities of both models in `ModelView.attentions` (the trainer switches them to eager
    # attention, the only implementation that returns them); an instance may set it from its options
    needs_attentions: ClassVar[bool] = False
    # teacher hidden_states indices read besides the final one (0 = embedding output; negative count from the end)
    teacher_layers: ClassVar[tuple[int, ...]] = ()
    # what is read of the teacher's logits: "full" (softmax distributions: a top-k cache serves top-k + one tail
    # bucket), "top-k" (only the largest entries, e.g. the argmax: exact from any top-k cache), "logits" (raw values
    # over the whole row, e.g. their std: a lossless cache only) or "none"
    teacher_distribution: ClassVar[str] = "full"
    # why a teacher cache (which holds rows at the teacher's label positions only) cannot serve this method; empty:
    # it can. An instance may set it from its options.
    teacher_cache_refusal: ClassVar[str] = ""

    def __init__(self, options: MethodOptions, context: MethodContext):
        super().__init__()
        self.options = options

    @classmethod
    def teacher_temperature(cls, options: MethodOptions) -> float:
        """τ at which the method's divergences read the teacher's distribution (a top-k teacher cache stores its tail
        mass there so those divergences see the exact mass outside the top k)."""
        return float(getattr(options, "kd_temperature", 1.0))

    @classmethod
    def option_names(cls) -> list[str]:
        """Names of the options this method accepts under `method.options`."""
        return [f.name for f in fields(cls.Options)]

    def forward(self, inputs: DistillationInputs) -> LossOutput:  # noqa: D401
        return self.compute_loss(inputs)

    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        raise NotImplementedError

    @classmethod
    def text_annotator(cls, options: MethodOptions) -> Any | None:
        """An annotator (`dwakd.data.units.TextAnnotator`) whose per-token units the method reads from
        `TokenView.units`, or None. Called before any data is tokenized, so a missing dependency fails early."""
        return None

    def param_groups(self) -> dict[str, dict[str, Any]]:
        """Optimizer settings for some of this method's parameters: {name prefix: {"lr": ..., ...}}.

        A parameter whose name (relative to the method) starts with a prefix gets its own optimizer group with
        those settings; every other method parameter is in the projector group (`method.projector_lr`).
        """
        return {}

    def state_to_save(self) -> dict[str, torch.Tensor]:
        """Tensors saved with each checkpoint (default: this module's state dict)."""
        return self.state_dict()

    def extra_repr(self) -> str:
        return f"name={self.name!r}"
