"""Sampled generation with the papers' protocol (docs/methods.md), reproducible per item and resumable per item.

Protocol: sampling at temperature 1.0, top_p 1.0, top_k off, no_repeat_ngram_size 6, prompt cut to its first
256 tokens (no BOS, as in training), left padding, stop at EOS. The reference code (MiniLLM/DSKD) pads every
prompt to 256 and allows `max_length - 256` = 256 new tokens, so no sequence exceeds 512; we keep that budget
(`GenerationSettings.max_new_tokens`) so a response's length limit does not depend on its batch neighbours.

Reproducibility. Hugging Face's sampler draws for the whole batch from one global generator, so a response
would depend on which items share its batch. Instead every item owns a generator seeded from (seed, item
index) (`item_seed`): at each step a final logits processor applies temperature/top-k/top-p, draws one uniform
number per row from that row's generator and picks the token by inverse CDF; `generate` then runs greedily on
the one-hot result. Guaranteed: the same model, weights, device and dtype give the same response for an item
whatever the batch size, batch order or resume point, up to floating-point differences that left padding
causes in the logits (a draw flips only if it lands within that error of a CDF boundary; not observed in
fp32 tests). Not guaranteed: equality across devices, dtypes or library versions.

Resume. Each (model, dataset, seed) has a JSONL file; each finished item is appended and flushed as soon as
its batch ends. A rerun reads the file (dropping a line cut off by a crash), skips items already there and,
when all are done, rewrites the file sorted by item index, so an interrupted and resumed run ends with the
same file as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dwakd.data.records import InstructionRecord

logger = logging.getLogger(__name__)

PROTOCOL_SEEDS = (10, 20, 30, 40, 50)


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; the defaults are the papers' protocol (docs/methods.md)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    no_repeat_ngram_size: int = 6
    max_prompt_length: int = 256
    max_length: int = 512
    max_new_tokens: int | None = None  # None: max_length - max_prompt_length (the reference code's budget)
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive (this is a sampling protocol)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.max_new_tokens is not None and not 0 < self.max_new_tokens <= self.max_length - self.max_prompt_length:
            raise ValueError(
                "max_new_tokens must be in [1, max_length - max_prompt_length = "
                f"{self.max_length - self.max_prompt_length}]"
            )

    @property
    def new_tokens(self) -> int:
        """Largest number of generated tokens per item."""
        return self.max_new_tokens if self.max_new_tokens is not None else self.max_length - self.max_prompt_length

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change a response (batch size does not), stored beside the generations."""
        values = asdict(self)
        values.pop("batch_size")
        values["max_new_tokens"] = self.new_tokens
        return values


def item_seed(seed: int, index: int) -> int:
    """The 63-bit seed of item `index` under run seed `seed` (stable across Python versions and platforms)."""
    digest = hashlib.sha256(f"dwakd-generation/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class PerItemSampler(LogitsProcessor):
    """Last logits processor: sample each row with its own generator; return scores that are 0 there, -inf elsewhere."""

    def __init__(self, generators: Sequence[torch.Generator], vocab_size: int, settings: GenerationSettings):
        self.generators = list(generators)
        self.vocab_size = vocab_size  # rows of the head beyond the tokenizer's vocabulary are never sampled
        self.warpers: list[LogitsProcessor] = []
        if settings.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            self.warpers.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(settings.top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.size(0) != len(self.generators):
            raise RuntimeError(f"sampler built for {len(self.generators)} rows, got {scores.size(0)}")
        real = scores[:, : self.vocab_size].float()  # (batch, vocab): padding rows of the head dropped
        for warper in self.warpers:  # HF warpers return new tensors; `scores` itself is left untouched
            real = warper(input_ids, real)
        cdf = torch.softmax(real, dim=-1).cumsum(-1, dtype=torch.float64)  # (batch, vocab)
        draws = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        targets = (draws.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)  # (batch, 1), in [0, total mass)
        # right=True: first index whose cumulative mass exceeds the draw, so zero-probability tokens never win.
        chosen = torch.searchsorted(cdf, targets, right=True).clamp_max(real.size(-1) - 1)
        out = torch.full(scores.shape, float("-inf"), dtype=scores.dtype, device=scores.device)
        return out.scatter_(1, chosen, 0.0)


def encode_prompts(tokenizer: Any, records: Sequence[InstructionRecord], max_prompt_length: int) -> list[list[int]]:
    """Prompt token ids without special tokens, cut to the first `max_prompt_length` tokens (docs/methods.md)."""
    encoded = tokenizer([r.prompt for r in records], add_special_tokens=False)["input_ids"]
    return [list(ids[:max_prompt_length]) for ids in encoded]


def decode_response(tokenizer: Any, token_ids: Sequence[int], strip: bool = True) -> tuple[str, int, bool]:
    """(text, tokens before EOS, stopped at EOS): cut at the first EOS id, decode without specials, cut at EOS text,
    strip (unless `strip=False`: on-policy training keeps the text as sampled)."""
    ids = list(token_ids)
    eos_ids = _eos_ids(tokenizer)
    stop = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    kept = ids if stop is None else ids[:stop]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    if tokenizer.eos_token and tokenizer.eos_token in text:
        text = text[: text.index(tokenizer.eos_token)]
    return (text.strip() if strip else text), len(kept), stop is not None


def _eos_ids(tokenizer: Any) -> set[int]:
    eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


@contextmanager
def _protocol_generation_config(model: Any) -> Iterator[None]:
    """Hide a checkpoint's own generation defaults (e.g. repetition_penalty) so only the protocol applies."""
    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@contextmanager
def _no_dropped_mask_warning(model: Any) -> Iterator[None]:
    """Hide the model config's pad id for one `generate` call, which silences a false alarm and changes nothing else.

    `generate` drops an all-ones attention mask (a batch of equal-length prompts has no padding) and then pads the
    rows that stopped at EOS; GPT-2 and similar models see pad ids without a mask and warn "pass an
    `attention_mask`", once per process, on every demo run. Those rows' outputs are discarded and the other rows
    hold no padding, so no response depends on it. The check reads `model.config.pad_token_id`; generation pads
    with the `GenerationConfig`'s own pad id. (A logging filter would not do: transformers caches the warning as
    said, hiding a later genuine one.)"""
    config = getattr(model, "config", None)
    saved = getattr(config, "pad_token_id", None)
    if saved is not None:
        config.pad_token_id = None
    try:
        yield
    finally:
        if saved is not None:
            config.pad_token_id = saved


@torch.no_grad()
def generate_batch(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    item_seeds: Sequence[int],
    settings: GenerationSettings,
    strip: bool = True,
) -> list[tuple[str, int, bool]]:
    """Sample one response per prompt (left padded); returns (text, response tokens, stopped at EOS) per item."""
    if len(prompt_ids) != len(item_seeds):
        raise ValueError("one seed per prompt is needed")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("empty prompt after tokenization")
    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):  # left padding
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in item_seeds]
    vocab_rows = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    vocab_size = min(len(tokenizer), vocab_rows) if vocab_rows else len(tokenizer)
    config = GenerationConfig(
        do_sample=False,  # the per-item sampler below does the sampling; greedy then picks its one-hot choice
        num_beams=1,
        max_new_tokens=settings.new_tokens,
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        repetition_penalty=1.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
    )
    with _protocol_generation_config(model), _no_dropped_mask_warning(model):
        sequences = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList([PerItemSampler(generators, vocab_size, settings)]),
        )
    return [decode_response(tokenizer, row[width:].tolist(), strip) for row in sequences.cpu()]


def read_generation_file(path: str | Path) -> dict[int, dict]:
    """Rows of a generation JSONL by item index; a last line cut off mid-write is dropped (and the file repaired)."""
    path = Path(path)
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows: dict[int, dict] = {}
    good: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            index = int(row["index"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if number == len(lines):  # an interrupted append: drop it
                logger.warning("%s: dropping an incomplete last line (interrupted run)", path)
                continue
            raise ValueError(f"{path}, line {number}: not a generation row (JSON with an 'index')") from None
        rows[index] = row
        good.append(line if line.endswith("\n") else line + "\n")
    if len(good) != sum(1 for line in lines if line.strip()) or (lines and not lines[-1].endswith("\n")):
        _write_atomic(path, "".join(good))
    return rows


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def generation_row(index: int, record: InstructionRecord, seed: int, text: str, n_tokens: int, stopped: bool) -> dict:
    """One line of a generation file."""
    return {
        "index": index,
        "instruction": record.instruction,
        "input": record.input,
        "prompt": record.prompt,
        "references": list(record.references),
        "response": text,
        "seed": seed,
        "response_tokens": n_tokens,
        "stopped_at_eos": stopped,
    }


def generate_seed_file(
    model: Any,
    tokenizer: Any,
    records: Sequence[InstructionRecord],
    seed: int,
    path: str | Path,
    settings: GenerationSettings = GenerationSettings(),
    *,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    progress: bool = True,
    desc: str | None = None,
    on_batch_done: Callable[[int], None] | None = None,
) -> list[dict]:
    """Generate (or finish generating) one seed's responses into `path`; returns the rows in item order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_generation_file(path)
    for index, row in done.items():
        if index < len(records) and row.get("prompt") != records[index].prompt:
            raise ValueError(
                f"{path}: item {index} was generated for a different prompt; the test set changed since. "
                "Use a new output directory (or --overwrite)."
            )
    todo = [i for i in range(len(records)) if i not in done]
    if todo:
        if prompt_ids is None:
            prompt_ids = encode_prompts(tokenizer, records, settings.max_prompt_length)
        # Longest prompts first: less padding per batch. Order does not change any response (per-item seeds).
        todo.sort(key=lambda i: (-len(prompt_ids[i]), i))
        bar = tqdm(total=len(records), initial=len(records) - len(todo), desc=desc or path.stem,
                   disable=not progress, unit="item", leave=False)
        try:
            with path.open("a", encoding="utf-8") as handle:
                for start in range(0, len(todo), settings.batch_size):
                    batch = todo[start : start + settings.batch_size]
                    outputs = generate_batch(model, tokenizer, [prompt_ids[i] for i in batch],
                                             [item_seed(seed, i) for i in batch], settings)
                    for index, (text, n_tokens, stopped) in zip(batch, outputs):
                        row = generation_row(index, records[index], seed, text, n_tokens, stopped)
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                        done[index] = row
                    handle.flush()
                    bar.update(len(batch))
                    if on_batch_done is not None:
                        on_batch_done(len(done))
        finally:
            bar.close()
    ordered = [done[i] for i in sorted(done)]
    _write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ordered))
    return [done[i] for i in range(len(records))]


def missing_items(path: str | Path, n_items: int) -> int:
    """How many of items 0..n_items-1 a generation file still lacks (without repairing it)."""
    path = Path(path)
    if not path.is_file():
        return n_items
    have: set[int] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            have.add(int(json.loads(line)["index"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return sum(1 for i in range(n_items) if i not in have)
