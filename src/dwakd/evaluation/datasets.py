"""Named evaluation sets: `name=path[:limit]` specs, built-in aliases for the MiniLLM test sets (docs/methods.md)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dwakd.data.records import InstructionRecord, load_records

# Alias -> (relative path under a data root in the MiniLLM/DSKD layout, column title as in paper Table 1).
BUILTIN_DATASETS: dict[str, tuple[str, str]] = {
    "dolly": ("dolly_dskd/valid.jsonl", "Dolly"),
    "selfinst": ("selfinst/valid.jsonl", "SelfInst"),
    "vicuna": ("vicuna/valid.jsonl", "Vicuna"),
    "sni": ("sni/11_/valid.jsonl", "S-NI"),
}
# The same sets' paths in MiniLLM's own layout (`data/<name>/valid.jsonl`; `dwakd data dolly --out ROOT/dolly`
# writes the first); an alias takes the first of its paths that exists under the data root.
MINILLM_PATHS: dict[str, str] = {
    "dolly": "dolly/valid.jsonl",
    "selfinst": "self-inst/valid.jsonl",
    "vicuna": "vicuna/valid.jsonl",
    "sni": "sinst/11_/valid.jsonl",
}
PAPER_DATASETS = ("dolly", "selfinst", "vicuna", "sni")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a named test set comes from: a JSONL file, a directory with `<split>.jsonl`, or a `datasets` name."""

    name: str
    source: str
    limit: int | None = None
    title: str | None = None  # column title in reports; defaults to the name
    split: str = "valid"

    @property
    def display(self) -> str:
        """The column title used in tables and plots."""
        return self.title or self.name


@dataclass(frozen=True)
class EvalDataset:
    """A loaded test set: its spec and records (the first `limit` rows of the source, in file order)."""

    spec: DatasetSpec
    records: tuple[InstructionRecord, ...]

    @property
    def name(self) -> str:
        return self.spec.name


def parse_dataset_spec(text: str, data_root: str | Path | None = None) -> DatasetSpec:
    """Parse `alias[:limit]` (dolly, selfinst, vicuna, sni under `data_root`) or `name=source[@split][:limit]`.

    A source is a JSONL file, a directory holding `<split>.jsonl`, or a `datasets` name; split defaults to "valid".
    """
    text = text.strip()
    limit: int | None = None
    match = re.match(r"^(.*):(\d+)$", text)
    if match:
        text, limit = match.group(1), int(match.group(2))
        if limit <= 0:
            raise ValueError(f"dataset spec {text!r}: limit must be positive")
    if "=" in text:
        name, source = (part.strip() for part in text.split("=", 1))
        if not _NAME.match(name):
            raise ValueError(f"dataset name {name!r}: use letters, digits, '_', '-', '.' (it names output folders)")
        if not source:
            raise ValueError(f"dataset spec {text!r}: empty path after '='")
        title = BUILTIN_DATASETS[name][1] if name in BUILTIN_DATASETS else None
        split = "valid"
        if "@" in source and not Path(source).exists():  # hub/datasets name with a split: org/set@test
            source, split = source.rsplit("@", 1)
        return DatasetSpec(name, source, limit, title, split)
    if text in BUILTIN_DATASETS:
        if data_root is None:
            raise ValueError(
                f"dataset alias {text!r} needs a data root (--data-root DIR holding {MINILLM_PATHS[text]} or "
                f"{BUILTIN_DATASETS[text][0]}), "
                f"or give it as {text}=PATH"
            )
        relative, title = BUILTIN_DATASETS[text]
        candidates = [Path(data_root) / MINILLM_PATHS[text], Path(data_root) / relative]
        source = next((path for path in candidates if path.exists()), candidates[-1])
        return DatasetSpec(text, str(source), limit, title)
    raise ValueError(
        f"dataset spec {text!r}: expected NAME=PATH[:LIMIT] or one of the aliases {', '.join(BUILTIN_DATASETS)}"
    )


def load_eval_dataset(spec: DatasetSpec) -> EvalDataset:
    """Load and validate the records of one test set (references may be lists, as in S-NI)."""
    records = load_records(spec.source, split=spec.split)
    if spec.limit is not None:
        records = records[: spec.limit]
    return EvalDataset(spec, tuple(records))


def load_eval_datasets(
    specs: Sequence[str | DatasetSpec], data_root: str | Path | None = None, limit: int | None = None
) -> list[EvalDataset]:
    """Parse and load several test sets; `limit` caps every set that has no limit of its own."""
    parsed = [s if isinstance(s, DatasetSpec) else parse_dataset_spec(s, data_root) for s in specs]
    names = [s.name for s in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"dataset names must be unique; repeated: {', '.join(duplicates)}")
    if limit is not None:
        parsed = [s if s.limit is not None else DatasetSpec(s.name, s.source, limit, s.title, s.split) for s in parsed]
    return [load_eval_dataset(s) for s in parsed]
