"""Per-token text units a method asks for (words, phrases, ...), computed once per example at tokenization time.

A method that reads units returns an annotator from `DistillationMethod.text_annotator(options)`; `encode_records`
runs it once over every record's prompt and response, and maps each unit to the input tokens of *both* sides by
character offsets. The collator pads the result into `units_<kind>` / `teacher_units_<kind>` tensors and the
trainer hands them to the method in `TokenView.units`. Methods that ask for nothing are unaffected.

Units of one kind are non-overlapping character spans [start, end) into the full text (prompt + response), in text
order; unit k is the same piece of text on both sides, so a method pairs the student's and the teacher's tokens of
a unit without any token alignment.

Token membership (`token_unit_ids`): a token belongs to the unit that contains its text with leading and trailing
whitespace stripped — a byte-level token " fox" belongs to the word "fox". A token that is only whitespace, or
whose text crosses a unit boundary, belongs to no unit. (The MTA reference code instead accepts tokens that start
up to one character before the unit, for the same purpose.)
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Protocol

from dwakd.config import ConfigError

Span = tuple[int, int]


class TextAnnotator(Protocol):
    """Finds units in text; `kinds` names what `annotate` returns for every example."""

    kinds: tuple[str, ...]

    def annotate(self, prompts: Sequence[str], responses: Sequence[str]) -> list[dict[str, list[Span]]]:
        """Per example, per kind: sorted, non-overlapping character spans into `prompt + response`."""
        ...


class UnitsUnavailableError(ConfigError):
    """The annotator a method needs cannot run here (an optional dependency is missing); says what to install.

    A ConfigError, so `dwakd train` reports it in one line before any data is read or model loaded."""


def token_unit_ids(offsets: Sequence[Sequence[int]], units: Sequence[Span], text: str) -> list[int]:
    """For each token (character span into `text`), the index of the unit containing it, −1 for none.

    `units` must be sorted and non-overlapping. Padding offsets (−1, −1) and empty spans belong to no unit.
    """
    starts = [start for start, _ in units]
    out: list[int] = []
    for start, end in offsets:
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if start < 0 or end <= start:
            out.append(-1)
            continue
        k = bisect.bisect_right(starts, start) - 1  # the last unit starting at or before the token's text
        out.append(k if k >= 0 and end <= units[k][1] else -1)
    return out


def check_units(units: Sequence[Span], text_length: int, kind: str) -> None:
    """Raise ValueError unless `units` are sorted, non-overlapping, non-empty spans inside the text."""
    previous_end = 0
    for start, end in units:
        if not 0 <= start < end <= text_length or start < previous_end:
            raise ValueError(f"text units of kind {kind!r} must be sorted, non-overlapping spans inside the text; "
                             f"got {(start, end)} after a unit ending at {previous_end}")
        previous_end = end
