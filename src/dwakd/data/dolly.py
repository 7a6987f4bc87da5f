"""`dwakd data dolly`: the papers' Dolly split (11,435 train / 1,000 dev / 500 test) from databricks-dolly-15k.

MiniLLM (microsoft/LMOps, `minillm/`) built the split that DSKD, DWA-KD and the other CTKD papers train and test
on; DSKD trains on its `train.jsonl`, validates on `dev.jsonl` and tests on MiniLLM's `valid.jsonl`. What is
known of how it was made, and what this module does at each step:

1. Text. Each Dolly record becomes `instruction`, `input` (Dolly's `context`) and `output` (Dolly's `response`),
   each stripped of surrounding whitespace (no record of the published files starts or ends with whitespace),
   and the Alpaca `prompt` (`dwakd.data.records.build_prompt`; the no-input form when `input` is empty).
2. Filter. MiniLLM dropped the records "too long to fit the context length" (LMOps issue #167) without
   publishing the rule. The longest prompt among the 1,500 published dev and test records is exactly 256 GPT-2
   tokens (several sit at 254–256), and 256 is MiniLLM's `--max-prompt-length`, so the rule here is: keep a record
   when its prompt is at most 256 GPT-2 tokens (`builtin:gpt2`, the same BPE). This is inferred, not published.
3. Test split. MiniLLM's `valid.jsonl` (500 records, in Dolly's order) was drawn at random with an unpublished
   seed, and so was the 1,000-record head of their shuffled `raw.jsonl` that `process_data_dolly.py` takes as the
   dev split (`raw[:1000]` -> dev, `raw[1000:]` -> train). Neither can be re-drawn from the raw data, so the
   membership and order of both are shipped: `assets/dolly-minillm-split.txt` lists a digest of each record of
   the published `dev.jsonl` and `valid.jsonl`, in file order (`split_manifest` rebuilds it from those files).
4. Train. Every other record that passes the filter, in Dolly's order (MiniLLM's train order is that of their
   shuffled `raw.jsonl`, which is not published; the Trainer shuffles anyway). With the filter of step 2 this
   should be 11,435 records; the command prints the count it got.

Files are written as the published ones are: `train.jsonl` / `dev.jsonl` with keys instruction, prompt, input,
output and `valid.jsonl` with topic (Dolly's `category`), instruction, input, output, prompt; `json.dumps` with its
defaults (ASCII escapes), one record a line. With the same Dolly text, `dev.jsonl` and `valid.jsonl` come out
byte-identical to the published files (their SHA-256 are `PUBLISHED_SHA256`; the command prints what it wrote).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dwakd.data.records import DataError, build_prompt

logger = logging.getLogger(__name__)

DOLLY_HUB_NAME = "databricks/databricks-dolly-15k"
MAX_PROMPT_TOKENS = 256  # step 2: prompt length limit, GPT-2 tokens
EXPECTED_COUNTS = {"train": 11435, "dev": 1000, "valid": 500}
# SHA-256 of MiniLLM's valid.jsonl and DSKD's dev.jsonl, which this command reproduces byte for byte.
PUBLISHED_SHA256 = {
    "dev": "a16927bf54fa96c945f267db083520301b751bdbab23c5f55f4482950bcb4f6c",
    "valid": "f2624572fdde0bec8759e63fecefdc5e38679816464cd57ef563612ccc6acc06",
}
MANIFEST_ASSET = "dolly-minillm-split.txt"
_MANIFEST_SPLITS = ("valid", "dev")  # the splits whose membership the manifest fixes; train is the rest


@dataclass
class DollyRecord:
    """One Dolly example in MiniLLM's fields (text already stripped)."""

    instruction: str
    input: str
    output: str
    topic: str = ""

    @property
    def prompt(self) -> str:
        return build_prompt(self.instruction, self.input)

    def digest(self) -> str:
        """64-bit hex digest of (instruction, input, output): how the manifest names a record."""
        text = json.dumps([self.instruction, self.input, self.output], ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def line(self, split: str) -> str:
        """The JSONL line in the published files' key order for `split`."""
        if split == "valid":
            obj = {"topic": self.topic, "instruction": self.instruction, "input": self.input, "output": self.output,
                   "prompt": self.prompt}
        else:
            obj = {"instruction": self.instruction, "prompt": self.prompt, "input": self.input, "output": self.output}
        return json.dumps(obj) + "\n"


@dataclass
class DollySplit:
    """The three splits, and what did not go into any of them."""

    splits: dict[str, list[DollyRecord]]
    too_long: int = 0  # records dropped by the prompt-length filter
    missing: dict[str, list[str]] = field(default_factory=dict)  # manifest digests with no matching record


def record_from_raw(obj: dict[str, Any], source: str, line: int) -> DollyRecord:
    """A raw Dolly row (instruction / context / response / category) or a MiniLLM row (input / output / topic)."""
    values = {}
    for name, keys in (("instruction", ("instruction",)), ("input", ("context", "input")),
                       ("output", ("response", "output")), ("topic", ("category", "topic"))):
        key = next((k for k in keys if k in obj), None)
        value = obj.get(key) if key else None
        if value is None and name in ("input", "topic"):
            value = ""
        if not isinstance(value, str):
            raise DataError(source, line, key or keys[0], "missing" if value is None else "expected a string")
        values[name] = value.strip()
    if not values["instruction"] or not values["output"]:
        raise DataError(source, line, "instruction" if not values["instruction"] else "response", "is empty")
    return DollyRecord(**values)


def load_dolly(source: str | Path = DOLLY_HUB_NAME, revision: str | None = None,
               cache_dir: str | None = None) -> list[DollyRecord]:
    """databricks-dolly-15k's rows in order, through `datasets`: a hub name, a local JSONL file or a local folder."""
    import datasets

    path = Path(source)
    if path.is_file():
        dataset = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
    elif path.is_dir() and (path / "dataset_info.json").is_file():
        dataset = datasets.load_from_disk(str(path))
    else:
        dataset = datasets.load_dataset(str(source), split="train", revision=revision, cache_dir=cache_dir)
    return [record_from_raw(row, str(source), index + 1) for index, row in enumerate(dataset)]


def read_manifest(path: str | Path | None = None) -> dict[str, list[str]]:
    """{split: [digest, ...]} in file order, from `path` or the shipped asset."""
    text = Path(path).read_text() if path else resources.files("dwakd").joinpath("assets", MANIFEST_ASSET).read_text()
    manifest: dict[str, list[str]] = {split: [] for split in _MANIFEST_SPLITS}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in manifest:
            raise DataError(str(path or MANIFEST_ASSET), number, None, f"expected '<split> <digest>', got {raw!r}")
        manifest[parts[0]].append(parts[1])
    return manifest


def split_manifest(dev_file: str | Path, valid_file: str | Path) -> str:
    """The manifest text for published `dev.jsonl` / `valid.jsonl` files (how the shipped asset was made)."""
    lines = ["# Membership and order of the Dolly dev (1,000) and test (500) splits of MiniLLM / DSKD.",
             "# <split> <first 16 hex digits of the SHA-256 of",
             "#          json.dumps([instruction, input, output], ensure_ascii=False)>",
             "# Made by dwakd.data.dolly.split_manifest from the published dev.jsonl and valid.jsonl."]
    for split, file in (("valid", valid_file), ("dev", dev_file)):
        for number, raw in enumerate(Path(file).read_text(encoding="utf-8").splitlines(), 1):
            lines.append(f"{split} {record_from_raw(json.loads(raw), str(file), number).digest()}")
    return "\n".join(lines) + "\n"


def prompt_lengths(records: Sequence[DollyRecord], tokenizer=None) -> list[int]:
    """GPT-2 token count of each record's prompt (the filter of step 2)."""
    if tokenizer is None:
        from dwakd.tokenizers import load_tokenizer

        tokenizer = load_tokenizer("builtin:gpt2")
    prompts = [r.prompt for r in records]
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]


def split_dolly(records: Iterable[DollyRecord], manifest: dict[str, list[str]] | None = None,
                max_prompt_tokens: int = MAX_PROMPT_TOKENS, tokenizer=None) -> DollySplit:
    """Filter by prompt length, place the manifest's records in its order, the rest (Dolly order) in train."""
    manifest = read_manifest() if manifest is None else manifest
    records = list(records)
    lengths = prompt_lengths(records, tokenizer)
    kept = [r for r, n in zip(records, lengths) if n <= max_prompt_tokens]
    by_digest: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(kept):
        by_digest[record.digest()].append(index)
    taken: set[int] = set()
    splits: dict[str, list[DollyRecord]] = {}
    missing: dict[str, list[str]] = {}
    for split in _MANIFEST_SPLITS:
        splits[split] = []
        for digest in manifest.get(split, []):
            free = [i for i in by_digest.get(digest, []) if i not in taken]
            if not free:
                missing.setdefault(split, []).append(digest)
                continue
            taken.add(free[0])  # a duplicated record: one copy here, the others stay in train
            splits[split].append(kept[free[0]])
    splits["train"] = [r for i, r in enumerate(kept) if i not in taken]
    return DollySplit(splits, too_long=len(records) - len(kept), missing=missing)


def write_split(split: DollySplit, out_dir: str | Path) -> dict[str, Path]:
    """Write train.jsonl, dev.jsonl and valid.jsonl (UTF-8, LF) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in ("train", "dev", "valid"):
        path = out / f"{name}.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as handle:
            handle.writelines(record.line(name) for record in split.splits[name])
        written[name] = path
    return written


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prepare_dolly(out_dir: str | Path, source: str | Path = DOLLY_HUB_NAME, *, revision: str | None = None,
                  manifest_file: str | Path | None = None, allow_missing: bool = False,
                  cache_dir: str | None = None, echo=print) -> DollySplit:
    """Load Dolly, split it like MiniLLM / DSKD, write the three files and report counts and checksums.

    Raises DataError when a dev/test record of the manifest is not in the data (a different Dolly revision, or
    not Dolly at all) unless `allow_missing`, in which case the files hold what was found.
    """
    records = load_dolly(source, revision=revision, cache_dir=cache_dir)
    split = split_dolly(records, read_manifest(manifest_file))
    if split.missing and not allow_missing:
        counts = ", ".join(f"{len(v)} of {EXPECTED_COUNTS[k]} {k}" for k, v in split.missing.items())
        raise DataError(str(source), None, None,
                        f"{counts} records of the papers' split are not in this data (is it databricks-dolly-15k, "
                        "the revision the papers used?); nothing written. --allow-missing writes what was found.")
    written = write_split(split, out_dir)
    echo(f"read {len(records)} Dolly records from {source}; {split.too_long} dropped "
         f"(prompt over {MAX_PROMPT_TOKENS} GPT-2 tokens)")
    for name, path in written.items():
        count = len(split.splits[name])
        digest = file_sha256(path)
        notes = []
        if count != EXPECTED_COUNTS[name]:
            notes.append(f"the papers have {EXPECTED_COUNTS[name]}")
        if name in PUBLISHED_SHA256:
            notes.append("identical to the published file" if digest == PUBLISHED_SHA256[name]
                         else "differs from the published file")
        note = f" ({'; '.join(notes)})" if notes else ""
        echo(f"  {path}: {count} records, sha256 {digest}{note}")
    return split


__all__ = ["DOLLY_HUB_NAME", "DollyRecord", "DollySplit", "load_dolly", "prepare_dolly", "read_manifest",
           "split_dolly", "split_manifest", "write_split"]
