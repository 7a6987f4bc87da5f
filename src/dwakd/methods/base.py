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

    kd_rate: float = 0.5  # loss = (1 - kd_rate) * CE + kd_rate * KD (docs/methods.md#2-loss-normalisation-and-optimisation)
    kd_temperature: float = 2.0  # τ

    def __post_init__(self) -> None:
        check_range("kd_rate", self.kd_rate, 0.0, 1.0)
        check_positive("kd_temperature", self.kd_temperature)


class DistillationMethod(nn.Module):
    """Base class: a method owns its trainable modules (projectors) and turns model outputs into a loss.

    Subclasses set `name`, `Options`, the `needs_*` flags, and implement `compute_loss`.
    Register with `@register_method`. The `MethodContext` is for building only; a method keeps what it needs.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    needs_teacher: ClassVar[bool] = True
    needs_hidden_states: ClassVar[bool] = False
    needs_teacher_hidden_states: ClassVar[bool] | None = None  # None: same as needs_hidden_states

    def __init__(self, options: MethodOptions, context: MethodContext):
        super().__init__()
        self.options = options

    @classmethod
    def option_names(cls) -> list[str]:
        """Names of the options this method accepts under `method.options`."""
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
