"""Checks for method options: each raises `OptionError`, reported to the user as `method.options.NAME`.

Kept below `dwakd.modules` and `dwakd.methods` so that shared components (e.g. DWA-KD's) validate their own knobs.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any


class OptionError(ValueError):
    """A bad value of one method option; `option` is its name under `method.options`."""

    def __init__(self, option: str, message: str):
        super().__init__(f"method.options.{option}: {message}")
        self.option = option


def check_choice(option: str, value: Any, choices: Collection[Any]) -> None:
    """Raise OptionError unless `value` is one of `choices`."""
    if value not in choices:
        raise OptionError(option, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_positive(option: str, value: Any, *, allow_zero: bool = False) -> None:
    """Raise OptionError unless `value` is a finite number > 0 (or ≥ 0 with `allow_zero`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise OptionError(option, f"must be a finite number {bound}; got {value!r}")


def check_range(option: str, value: Any, low: float, high: float) -> None:
    """Raise OptionError unless low ≤ value ≤ high."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
    if not ok:
        raise OptionError(option, f"must be a number in [{low}, {high}]; got {value!r}")


def check_steps(option: str, value: Any) -> None:
    """Raise OptionError unless `value` is a whole number of steps ≥ 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise OptionError(option, f"must be a whole number of steps ≥ 0; got {value!r}")
