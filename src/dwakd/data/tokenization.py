"""Dual tokenization (docs/methods.md): the same prompt and response tokenized by the student's and the teacher's
tokenizer.

Each side: prompt and response tokenized separately, no BOS, EOS appended to the response, prompt cut to
`max_prompt_length` tokens, the whole sequence to `max_length`. Labels are pre-shifted: position i predicts
token i+1; prompt positions are -100, so the last prompt token predicts the first response token.
Every token keeps its character span in the full text `prompt + response` (EOS gets the empty span at the end).
A method may ask for text units (`dwakd.data.units`): they are found once per record here and stored per token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dwakd.data.records import InstructionRecord
from dwakd.data.units import TextAnnotator, check_units, token_unit_ids

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class EncodedSide:
    """One tokenizer's encoding of one example (already shifted: len(input_ids) == len(labels))."""

    input_ids: list[int]
    labels: list[int]
    input_offsets: list[tuple[int, int]]
    label_offsets: list[tuple[int, int]]
    truncated: bool = False
    units: dict[str, list[int]] | None = None  # per input token: unit index of each kind, −1 for none


@dataclass
class EncodedExample:
    """Both sides of one record; `prompt` is the prompt text (on-policy training samples a response to it)."""

    student: EncodedSide
    teacher: EncodedSide | None
    index: int
    prompt: str = ""


@dataclass
class TokenizationStats:
    """What truncation did to a dataset, per side, and which records were dropped (no response token left)."""

    examples: int = 0
    prompt_truncated: dict[str, int] = field(default_factory=lambda: {"student": 0, "teacher": 0})
    response_truncated: dict[str, int] = field(default_factory=lambda: {"student": 0, "teacher": 0})
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.examples} examples"]
        for side in ("student", "teacher"):
            p, r = self.prompt_truncated[side], self.response_truncated[side]
            if p or r:
                parts.append(f"{side}: {p} prompts cut, {r} responses cut")
        if self.dropped:
            shown = ", ".join(self.dropped[:10]) + (" ..." if len(self.dropped) > 10 else "")
            parts.append(f"{len(self.dropped)} dropped with no response token left ({shown})")
        return "; ".join(parts)


def encode_side(
    prompt_ids: Sequence[int],
    prompt_offsets: Sequence[tuple[int, int]],
    response_ids: Sequence[int],
    response_offsets: Sequence[tuple[int, int]],
    prompt_chars: int,
    eos_id: int,
    max_prompt_length: int,
    max_length: int,
) -> tuple[EncodedSide, bool]:
    """Assemble one side from separately tokenized prompt/response; returns (encoding, prompt_was_cut)."""
    prompt_cut = len(prompt_ids) > max_prompt_length
    p_ids = list(prompt_ids[:max_prompt_length])
    p_off = [tuple(o) for o in prompt_offsets[:max_prompt_length]]
    end = prompt_chars + (response_offsets[-1][1] if len(response_offsets) else 0)
    r_ids = list(response_ids) + [eos_id]
    r_off = [(s + prompt_chars, e + prompt_chars) for s, e in response_offsets] + [(end, end)]
    full_ids, full_off = p_ids + r_ids, p_off + r_off
    truncated = len(full_ids) > max_length
    full_ids, full_off = full_ids[:max_length], full_off[:max_length]
    n_prompt = len(p_ids)
    labels = list(full_ids[1:])
    for i in range(min(max(n_prompt - 1, 0), len(labels))):
        labels[i] = IGNORE_INDEX
    side = EncodedSide(full_ids[:-1], labels, full_off[:-1], full_off[1:], truncated)
    return side, prompt_cut


def _batch_encode(tokenizer, texts: list[str]):
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def encode_records(
    records: Sequence[InstructionRecord],
    student_tokenizer,
    teacher_tokenizer=None,
    *,
    max_prompt_length: int = 256,
    max_length: int = 512,
    show_progress: bool = True,
    chunk_size: int = 1024,
    annotator: TextAnnotator | None = None,
) -> tuple[list[EncodedExample], TokenizationStats]:
    """Tokenize every record on both sides; drops (and reports) records left with no response token.

    With an `annotator`, each record's text units are found once and stored per input token on both sides.
    """
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
    sides = {"student": student_tokenizer}
    if teacher_tokenizer is not None:
        sides["teacher"] = teacher_tokenizer
    stats = TokenizationStats()
    examples: list[EncodedExample] = []
    bar = tqdm(total=len(records), desc="tokenizing", unit="ex", disable=not show_progress)
    for start in range(0, len(records), chunk_size):
        chunk = records[start : start + chunk_size]
        prompts = [r.prompt for r in chunk]
        responses = [r.response for r in chunk]
        encoded: dict[str, list[EncodedSide]] = {}
        for name, tokenizer in sides.items():
            p_ids, p_off = _batch_encode(tokenizer, prompts)
            r_ids, r_off = _batch_encode(tokenizer, responses)
            encoded[name] = []
            for k, record in enumerate(chunk):
                side, prompt_cut = encode_side(p_ids[k], p_off[k], r_ids[k], r_off[k], len(record.prompt),
                                               tokenizer.eos_token_id, max_prompt_length, max_length)
                stats.prompt_truncated[name] += prompt_cut
                stats.response_truncated[name] += side.truncated
                encoded[name].append(side)
        if annotator is not None:
            _attach_units(annotator, chunk, encoded)
        for k, record in enumerate(chunk):
            student = encoded["student"][k]
            teacher = encoded["teacher"][k] if "teacher" in encoded else None
            if not any(t != IGNORE_INDEX for t in student.labels) or (
                teacher is not None and not any(t != IGNORE_INDEX for t in teacher.labels)
            ):
                stats.dropped.append(f"{record.source}:{record.line}" if record.source else f"#{start + k}")
                continue
            examples.append(EncodedExample(student, teacher, start + k, record.prompt))
        bar.update(len(chunk))
    bar.close()
    stats.examples = len(examples)
    if stats.dropped:
        logger.warning("tokenization: %s", stats.summary())
    return examples, stats


def _attach_units(annotator: TextAnnotator, records: Sequence[InstructionRecord],
                  encoded: dict[str, list[EncodedSide]]) -> None:
    """Find each record's units once and store, per side, the unit index of every input token."""
    found = annotator.annotate([r.prompt for r in records], [r.response for r in records])
    for k, record in enumerate(records):
        text = record.prompt + record.response
        for kind in annotator.kinds:
            check_units(found[k][kind], len(text), kind)
        for sides in encoded.values():
            side = sides[k]
            side.units = {kind: token_unit_ids(side.input_offsets, found[k][kind], text) for kind in annotator.kinds}


class DualTokenizedDataset(Dataset):
    """A list of `EncodedExample`s as a torch Dataset (the Trainer shuffles and batches it)."""

    def __init__(self, examples: list[EncodedExample], stats: TokenizationStats | None = None):
        self.examples = examples
        self.stats = stats

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> EncodedExample:
        return self.examples[index]

    def lengths(self) -> list[int]:
        """Tokens per example over both sides (what `data.group_by_length` sorts by: each side's forward pass
        costs in proportion to its own length)."""
        return [len(e.student.input_ids) + (len(e.teacher.input_ids) if e.teacher is not None else 0)
                for e in self.examples]
