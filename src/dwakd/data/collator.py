"""Collation with dynamic padding: right padding for training, left padding for generation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dwakd.data.tokenization import IGNORE_INDEX, EncodedExample, EncodedSide

PAD_OFFSET = (-1, -1)
# Keys of a batch that are not model inputs: the prompt text and example index (on-policy training samples a
# response to each prompt, seeded per example), and what on-policy sampling adds. The trainer pops them.
META_KEYS = ("prompt_text", "example_index", "on_policy", "samples")


def pad_sequences(
    sequences: Sequence[Sequence], pad_value, side: str = "right", multiple_of: int | None = None
) -> torch.Tensor:
    """Stack variable-length lists into one tensor, padding on `side`; items may be ints or (start, end) pairs."""
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    if not sequences:
        return torch.empty((0, 0), dtype=torch.long)
    length = max(len(s) for s in sequences)
    if multiple_of:
        length = -(-length // multiple_of) * multiple_of
    rows = []
    for seq in sequences:
        pad = [pad_value] * (length - len(seq))
        rows.append(list(seq) + pad if side == "right" else pad + list(seq))
    return torch.tensor(rows, dtype=torch.long)


def collate_side(sides: Sequence[EncodedSide], pad_id: int, side: str = "right", multiple_of: int | None = None,
                 prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of one tokenizer's view: input_ids, attention_mask, labels, input_offsets, label_offsets
    (and `units_<kind>` when the examples carry text units)."""
    ids = [s.input_ids for s in sides]
    batch = {
        f"{prefix}input_ids": pad_sequences(ids, pad_id, side, multiple_of),
        f"{prefix}attention_mask": pad_sequences([[1] * len(x) for x in ids], 0, side, multiple_of),
        f"{prefix}labels": pad_sequences([s.labels for s in sides], IGNORE_INDEX, side, multiple_of),
        f"{prefix}input_offsets": pad_sequences([s.input_offsets for s in sides], PAD_OFFSET, side, multiple_of),
        f"{prefix}label_offsets": pad_sequences([s.label_offsets for s in sides], PAD_OFFSET, side, multiple_of),
    }
    if sides and sides[0].units is not None:  # text units a method asked for: −1 on padding
        for kind in sides[0].units:
            batch[f"{prefix}units_{kind}"] = pad_sequences([s.units[kind] for s in sides], -1, side, multiple_of)
    return batch


@dataclass
class DistillationCollator:
    """Batch `EncodedExample`s: student keys unprefixed (`labels` is what the Trainer counts), teacher keys
    `teacher_*`, plus `prompt_text` (list of str) and `example_index` (batch,) (see META_KEYS)."""

    student_pad_id: int
    teacher_pad_id: int | None = None
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[EncodedExample]) -> dict[str, torch.Tensor]:
        batch = collate_side([e.student for e in examples], self.student_pad_id, self.padding_side,
                             self.pad_to_multiple_of)
        if examples and examples[0].teacher is not None:
            if self.teacher_pad_id is None:
                raise ValueError("teacher views present but no teacher pad id given to the collator")
            batch.update(collate_side([e.teacher for e in examples], self.teacher_pad_id, self.padding_side,
                                      self.pad_to_multiple_of, prefix="teacher_"))
        batch["prompt_text"] = [e.prompt for e in examples]
        batch["example_index"] = torch.tensor([e.index for e in examples], dtype=torch.long)
        return batch
