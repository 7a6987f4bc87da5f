"""On-policy cross-tokenizer distillation (docs/methods.md#10-on-policy-distillation).

With probability `on_policy.fraction` (GKD's λ) a micro-batch is replaced by the student's own samples: the
student samples a response to each prompt of the micro-batch, the text is decoded and dual-tokenized exactly as
the data is (`dwakd.data.tokenization.encode_records`: prompt and response tokenized separately per side,
character offsets, EOS appended, prompt and total truncation), and the method's loss is computed on that pair of
views, the teacher forwarded on its own tokenization of the same text. Every method with a teacher works
unchanged: it sees an ordinary batch.

Determinism. Nothing extra is checkpointed; every random choice is a hash of values a resumed run knows:
- whether micro-batch k of optimizer step s is on-policy: `uniform(seed, s, k) < fraction` (`is_on_policy`).
  It does not depend on the rank, so all ranks of a step make the same choice (ZeRO-3 and FSDP gather parameters
  collectively for generation, so they must);
- the sampling generator of each example: seeded from (seed, s, example index) (`sample_seed`), the per-item
  sampler of `dwakd.evaluation.generation` (an item's sample does not depend on its batch neighbours, its rank or
  its micro-batch: two processes with half the batch each sample what one process with the whole batch samples,
  up to float differences that left padding causes in the logits).

Choices where GKD/GOLD/the issue say nothing:
- sampling runs with the student in eval mode (no dropout; gradient checkpointing, which Hugging Face layers apply
  only in training mode, is off, so the KV cache is used); all on-policy micro-batches of one step are generated
  in one batched `generate` call;
- the decoded response is kept exactly (not stripped) and cut at the first EOS id; special tokens are skipped;
- EOS is a label only when the student sampled it: a sample cut by `max_new_tokens` keeps its last response token
  as the last label, like a data response cut by `data.max_length` (an empty unfinished sample keeps EOS, so
  every row has a label);
- `max_new_tokens` defaults to `data.max_length - data.max_prompt_length`, so no sequence exceeds the data's
  length limit and no batch composition changes a sample's length limit;
- the token count that normalises the loss (`num_items_in_batch`) is taken after the step's micro-batches are
  replaced (`DistillationTrainer.get_batch_samples`), so it is exact under gradient accumulation and DDP.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dwakd.config import OnPolicyConfig
from dwakd.data.collator import DistillationCollator
from dwakd.data.records import InstructionRecord
from dwakd.data.tokenization import IGNORE_INDEX, EncodedExample, encode_records
from dwakd.evaluation.generation import GenerationSettings, generate_batch
from dwakd.interface import ModelView, TokenView

SAMPLES_FILE = "on_policy_samples.jsonl"


def _uniform(*parts: Any) -> float:
    """A number in [0, 1) from a hash of `parts` (stable across Python versions, platforms and processes)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def is_on_policy(fraction: float, seed: int, step: int, micro_batch: int) -> bool:
    """Whether micro-batch `micro_batch` of optimizer step `step` trains on the student's samples."""
    if fraction <= 0.0:
        return False
    return fraction >= 1.0 or _uniform("dwakd-on-policy/decide", seed, step, micro_batch) < fraction


def sample_seed(seed: int, step: int, example_index: int) -> int:
    """63-bit seed of the sampling generator of one example at one optimizer step."""
    digest = hashlib.sha256(f"dwakd-on-policy/sample/{seed}/{step}/{example_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class Sample:
    """One sampled response and where it came from."""

    example_index: int
    prompt: str
    response: str
    generated_tokens: int  # tokens the student generated before EOS
    stopped_at_eos: bool


class OnPolicySampler:
    """Turns micro-batches of data into micro-batches of the student's own samples, dual-tokenized like the data."""

    def __init__(self, config: OnPolicyConfig, student_tokenizer: Any, teacher_tokenizer: Any,
                 collator: DistillationCollator, *, max_prompt_length: int, max_length: int, seed: int,
                 annotator: Any = None):
        if teacher_tokenizer is None:
            raise ValueError("on-policy training needs the teacher's tokenizer to score the samples")
        self.config = config
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.collator = collator
        self.max_prompt_length = max_prompt_length
        self.max_length = max_length
        self.seed = seed
        self.annotator = annotator  # the method's text units (MTA), found on each sample like on the data
        new_tokens = config.max_new_tokens or max_length - max_prompt_length
        # Only the decoding fields matter to `generate_batch`; the lengths make its budget `new_tokens`.
        self.settings = GenerationSettings(
            temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
            no_repeat_ngram_size=config.no_repeat_ngram_size, max_prompt_length=max_prompt_length,
            max_length=max_prompt_length + new_tokens, max_new_tokens=new_tokens)

    def decide(self, step: int, micro_batch: int) -> bool:
        """Whether this micro-batch of this step is replaced by samples (same answer on every rank)."""
        return is_on_policy(self.config.fraction, self.seed, step, micro_batch)

    # ---- sampling ------------------------------------------------------------------------------------------------
    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Student prompt tokens as the data has them: no special tokens, the first `max_prompt_length`."""
        encoded = self.student_tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return [list(ids[: self.max_prompt_length]) for ids in encoded]

    @torch.no_grad()
    def sample(self, student: Any, prompts: Sequence[str], example_indices: Sequence[int], step: int) -> list[Sample]:
        """One response per prompt from `student` (batched, KV cache, one generator per example)."""
        if not prompts:
            return []
        seeds = [sample_seed(self.seed, step, int(i)) for i in example_indices]
        outputs = generate_batch(student, self.student_tokenizer, self.prompt_ids(prompts), seeds, self.settings,
                                 strip=False)
        return [Sample(int(index), prompt, text, n_tokens, stopped)
                for index, prompt, (text, n_tokens, stopped) in zip(example_indices, prompts, outputs)]

    # ---- dual tokenization -----------------------------------------------------------------------------------------
    def encode(self, samples: Sequence[Sample]) -> list[EncodedExample]:
        """Prompt + sampled response on both sides with the data's rules; EOS is a label only where it was sampled."""
        records = [InstructionRecord(s.prompt, (s.response,)) for s in samples]
        examples, stats = encode_records(records, self.student_tokenizer, self.teacher_tokenizer,
                                         max_prompt_length=self.max_prompt_length, max_length=self.max_length,
                                         show_progress=False, annotator=self.annotator)
        if len(examples) != len(samples):  # cannot happen: a prompt is cut below max_length, so a label remains
            raise RuntimeError(f"on-policy samples lost in tokenization: {stats.summary()}")
        for example, sample in zip(examples, samples):
            example.index = sample.example_index
            if not sample.stopped_at_eos:
                _drop_final_eos_label(example.student)
                _drop_final_eos_label(example.teacher)
        return examples

    def collate(self, samples: Sequence[Sample], device: torch.device | str | None = None) -> dict[str, Any]:
        """A training micro-batch of samples, marked `on_policy`, with the samples for logging."""
        batch = self.collator(self.encode(samples))
        if device is not None:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch["on_policy"] = True
        batch["samples"] = [vars(s).copy() for s in samples]
        return batch

    def replace(self, student: Any, batches: list[dict[str, Any]], chosen: Sequence[int], step: int) -> None:
        """Replace `batches[k]` for every k in `chosen` by samples to the same prompts (one generate call)."""
        prompts: list[str] = []
        indices: list[int] = []
        for k in chosen:
            prompts += list(batches[k]["prompt_text"])
            indices += [int(i) for i in batches[k]["example_index"].tolist()]
        samples = self.sample(student, prompts, indices, step)
        start = 0
        for k in chosen:
            n = len(batches[k]["prompt_text"])
            batches[k] = self.collate(samples[start : start + n], device=batches[k]["labels"].device)
            start += n


def _drop_final_eos_label(side: Any) -> None:
    """Unlabel the EOS that tokenization appended to a sample the student did not end (kept if it is the row's
    only label). Untruncated, a side's last label is that EOS by construction (`encode_side`)."""
    if side is None or side.truncated or sum(label != IGNORE_INDEX for label in side.labels) <= 1:
        return
    side.labels[-1] = IGNORE_INDEX


# ---- the student, whole and in eval mode, for generation ------------------------------------------------------------
@contextmanager
def student_for_generation(trainer: Any) -> Iterator[Any]:
    """The trainer's student ready for `generate`: unwrapped, whole, in eval mode.

    Eval mode also switches gradient checkpointing off for generation (Hugging Face layers checkpoint, and drop the
    KV cache, only in training mode). DDP: the wrapped module's own student, no collective. FSDP: every shard
    gathered with `summon_full_params(writeback=False)`. DeepSpeed ZeRO-3: the student's partitions gathered with
    `deepspeed.zero.GatheredParameters` and the engine's fetch/release hooks lifted while generating, as TRL's
    `unwrap_model_for_generation` does. Both gathers are collectives: every rank enters together.
    """
    core = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    student = core.student
    was_training = student.training
    with ExitStack() as stack:
        if getattr(trainer, "is_fsdp_enabled", False):
            from torch.distributed.fsdp import FullyShardedDataParallel

            stack.enter_context(FullyShardedDataParallel.summon_full_params(
                trainer.model_wrapped, writeback=False, recurse=True))
        elif _is_zero3(trainer):
            stack.enter_context(_gathered_zero3(trainer.model_wrapped, student))
        student.eval()
        try:
            yield student
        finally:
            student.train(was_training)


def _is_zero3(trainer: Any) -> bool:
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return False
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


@contextmanager
def _gathered_zero3(engine: Any, student: torch.nn.Module) -> Iterator[None]:
    """Gather the student's ZeRO-3 partitions and lift the engine's per-module hooks until the block ends."""
    import deepspeed

    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    with deepspeed.zero.GatheredParameters(list(student.parameters())):
        if offload is None:
            yield
            return
        for param in offload.module.parameters(recurse=True):
            getattr(param, "ds_active_sub_modules", set()).clear()
        for hook in list(offload.forward_hooks) + list(offload.backward_hooks):
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


# ---- scores of the samples, for inspection ---------------------------------------------------------------------------
@torch.no_grad()
def sequence_log_likelihood(out: ModelView, view: TokenView) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of log p(label) over the row's labels, number of labels), on this model's own tokens."""
    logits, _ = out.label_logits(view)  # (K, rows) at the label positions, row-major
    mask = view.label_mask
    labels = view.labels[mask]  # (K,)
    log_probs = torch.log_softmax(logits[:, : out.vocab_size].float(), dim=-1)
    picked = log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)  # (K,)
    rows = mask.nonzero()[:, 0]
    totals = torch.zeros(mask.shape[0], dtype=torch.float64, device=picked.device)
    totals.index_add_(0, rows, picked.double())
    return totals, mask.sum(1)


class SampleWriter:
    """Appends each on-policy sample with its scores to a JSONL file (one per rank beyond the first)."""

    def __init__(self, output_dir: str, rank: int = 0, world_size: int = 1):
        name = SAMPLES_FILE if world_size <= 1 else SAMPLES_FILE.replace(".jsonl", f".rank{rank}.jsonl")
        self.path = Path(output_dir) / name
        self._checked = False

    def write(self, step: int, samples: Sequence[dict], scores: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        if not self._checked:
            self._drop_from(step)  # a resumed run regenerates the steps after its checkpoint
            self._checked = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        s_sum, s_n = (t.tolist() for t in scores["student"])
        t_sum, t_n = (t.tolist() for t in scores["teacher"])
        with self.path.open("a", encoding="utf-8") as handle:
            for k, sample in enumerate(samples):
                row = {"step": step, **sample,
                       "student_tokens": int(s_n[k]), "teacher_tokens": int(t_n[k]),
                       "student_logprob": s_sum[k], "teacher_logprob": t_sum[k],
                       "student_mean_logprob": s_sum[k] / max(1, s_n[k]),
                       "teacher_mean_logprob": t_sum[k] / max(1, t_n[k])}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    def _drop_from(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] < step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut off by a kill
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)
