"""Instruction records: load from JSONL or `datasets`, validate every field, build the Alpaca prompt.

Formats and the prompt template: docs/methods.md.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Alpaca's sections, and its preamble sentence before them (the full template is preamble + sections)
SECTIONS_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
SECTIONS_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n" + SECTIONS_WITH_INPUT
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n" + SECTIONS_NO_INPUT
)

class DataError(ValueError):
    """A record could not be read; the message names the source, the line and the field."""

    def __init__(self, source: str, line: int | None, field_name: str | None, problem: str):
        self.source, self.line, self.field_name, self.problem = source, line, field_name, problem
        where = source + (f", line {line}" if line is not None else "")
        what = f", field '{field_name}'" if field_name else ""
        super().__init__(f"{where}{what}: {problem}")


@dataclass(frozen=True)
class InstructionRecord:
    """One example: the full prompt text and one or more reference responses (the first is trained on)."""

    prompt: str
    references: tuple[str, ...]
    instruction: str = ""
    input: str = ""
    source: str = ""
    line: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def response(self) -> str:
        """The training target: the first reference."""
        return self.references[0]


def build_prompt(instruction: str, input_text: str = "", preamble: bool = True) -> str:
    """The Alpaca prompt of docs/methods.md (with or without the input block); `preamble=False` leaves out its
    opening sentence (the demo's short prompt)."""
    with_input, no_input = ((PROMPT_WITH_INPUT, PROMPT_NO_INPUT) if preamble
                            else (SECTIONS_WITH_INPUT, SECTIONS_NO_INPUT))
    if input_text and input_text.strip():
        return with_input.format(instruction=instruction, input=input_text)
    return no_input.format(instruction=instruction)


# Field names per accepted format, in order of preference: (instruction, input, output).
_INSTRUCTION_KEYS = ("instruction",)
_INPUT_KEYS = ("input", "context")
_OUTPUT_KEYS = ("output", "response")


def _text_field(obj: dict, key: str, source: str, line: int, *, allow_empty: bool) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(source, line, key, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(source, line, key, "is empty")
    return value


def record_from_dict(
    obj: Any, source: str = "<memory>", line: int = 0, *, require_output: bool = True
) -> InstructionRecord:
    """Validate one raw object (Dolly, MiniLLM/Alpaca or prompt/output) and turn it into a record."""
    if not isinstance(obj, dict):
        raise DataError(source, line, None, f"expected a JSON object, got {type(obj).__name__}")
    out_key = next((k for k in _OUTPUT_KEYS if k in obj), None)
    references: tuple[str, ...] = ()
    if out_key is None:
        if require_output:
            raise DataError(source, line, "output", "missing (expected one of 'output' or 'response')")
    else:
        value = obj[out_key]
        if isinstance(value, list):
            if not value:
                raise DataError(source, line, out_key, "is an empty list of references")
            for i, ref in enumerate(value):
                if not isinstance(ref, str):
                    raise DataError(source, line, f"{out_key}[{i}]", f"expected a string, got {type(ref).__name__}")
                if not ref.strip():
                    raise DataError(source, line, f"{out_key}[{i}]", "is empty")
            references = tuple(value)
        else:
            references = (_text_field(obj, out_key, source, line, allow_empty=False),)

    instruction = _text_field(obj, "instruction", source, line, allow_empty=False) if "instruction" in obj else ""
    in_key = next((k for k in _INPUT_KEYS if k in obj and obj[k] is not None), None)
    input_text = _text_field(obj, in_key, source, line, allow_empty=True) if in_key else ""
    if "prompt" in obj and obj["prompt"] is not None:
        prompt = _text_field(obj, "prompt", source, line, allow_empty=False)
    elif instruction:
        prompt = build_prompt(instruction, input_text)
    else:
        raise DataError(source, line, "instruction", "missing (need 'instruction' or a ready 'prompt')")
    known = {"instruction", "prompt", *_INPUT_KEYS, *_OUTPUT_KEYS}
    extra = {k: v for k, v in obj.items() if k not in known}
    return InstructionRecord(prompt, references, instruction, input_text, source, line, extra)


@dataclass
class LoadReport:
    """What loading skipped: (source, line, message) per invalid row."""

    skipped: list[tuple[str, int, str]] = field(default_factory=list)

    def summary(self) -> str:
        if not self.skipped:
            return "all rows valid"
        lines = ", ".join(f"{Path(s).name}:{ln}" for s, ln, _ in self.skipped[:20])
        more = "" if len(self.skipped) <= 20 else f" (+{len(self.skipped) - 20} more)"
        return f"skipped {len(self.skipped)} invalid row(s): {lines}{more}"


def _iter_jsonl(path: Path) -> Iterable[tuple[int, str]]:
    with path.open("r", encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if text.strip():
                yield number, text


def load_jsonl_records(
    path: str | Path, *, skip_invalid: bool = False, require_output: bool = True, report: LoadReport | None = None
) -> list[InstructionRecord]:
    """Read and validate a JSONL file; invalid rows raise `DataError` or, with `skip_invalid`, are counted."""
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.parent.name == "dolly" and path.name in ("train.jsonl", "dev.jsonl", "valid.jsonl"):
            hint = f"; `dwakd data dolly --out {path.parent}` makes the papers' Dolly split there"
        raise DataError(str(path), None, None, f"file not found{hint}")
    report = report if report is not None else LoadReport()
    records: list[InstructionRecord] = []
    try:
        rows = list(_iter_jsonl(path))
    except UnicodeDecodeError as exc:
        raise DataError(str(path), None, None, f"not UTF-8 text ({exc})") from exc
    for number, text in rows:
        try:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(str(path), number, None, f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
            records.append(record_from_dict(obj, str(path), number, require_output=require_output))
        except DataError as exc:
            if not skip_invalid:
                raise
            report.skipped.append((str(path), number, str(exc)))
    if report.skipped:
        logger.warning("%s: %s", path, report.summary())
    return records


def load_records(
    sources: str | Path | Sequence[str | Path],
    *,
    split: str = "train",
    skip_invalid: bool = False,
    require_output: bool = True,
    report: LoadReport | None = None,
) -> list[InstructionRecord]:
    """Load records from JSONL file(s), a directory holding `<split>.jsonl`, or a `datasets` name/path."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    records: list[InstructionRecord] = []
    for source in sources:
        path = Path(source)
        if path.is_dir() and (path / f"{split}.jsonl").is_file():
            path = path / f"{split}.jsonl"
        if path.suffix in (".jsonl", ".json") or path.is_file():
            records += load_jsonl_records(path, skip_invalid=skip_invalid, require_output=require_output, report=report)
        else:
            records += _load_hf_dataset(str(source), split, skip_invalid, require_output, report)
    if not records:
        raise DataError(", ".join(map(str, sources)), None, None, "no valid records")
    return records


def _load_hf_dataset(
    name: str, split: str, skip_invalid: bool, require_output: bool, report: LoadReport | None
) -> list[InstructionRecord]:
    """Load a `datasets` dataset by hub name or local path; row numbers are 1-based like JSONL lines."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types; name the source either way
        raise DataError(name, None, None, f"could not load as a file or a `datasets` dataset: {exc}") from exc
    report = report if report is not None else LoadReport()
    records = []
    for number, row in enumerate(dataset, start=1):
        try:
            records.append(record_from_dict(dict(row), f"{name}[{split}]", number, require_output=require_output))
        except DataError as exc:
            if not skip_invalid:
                raise
            report.skipped.append((name, number, str(exc)))
    return records


def split_records(
    records: Sequence[InstructionRecord], sizes: dict[str, int | float], seed: int = 42
) -> dict[str, list[InstructionRecord]]:
    """Deterministic shuffled split; sizes are counts or fractions, a split of size -1 takes the rest."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    total = len(order)
    counts: dict[str, int] = {}
    for name, size in sizes.items():
        if size == -1:
            continue
        counts[name] = int(round(size * total)) if isinstance(size, float) and size < 1 else int(size)
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError("only one split may take the rest (-1)")
    if sum(counts.values()) > total:
        raise ValueError(f"split sizes {counts} exceed the {total} records")
    if rest:
        counts[rest[0]] = total - sum(counts.values())
    out: dict[str, list[InstructionRecord]] = {}
    start = 0
    for name in sizes:
        out[name] = [records[i] for i in order[start : start + counts[name]]]
        start += counts[name]
    return out
