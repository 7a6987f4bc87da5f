"""Tiny tokenizers, models and test sets for the evaluation tests (random init, built in-process, no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nName three colours of the rainbow.\n\n### Response:\nRed, orange and yellow.",
    "### Input:\nThe cat sat on the mat while the dog slept by the fire.",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.",
    "Water boils at one hundred degrees. Ice melts at zero degrees. Running and swimming are good exercise.",
] * 3


def make_tokenizer(vocab_size: int = 320, save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences; EOS = pad = '<|endoftext|>' (GPT-2 style)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if save_dir is not None:
        fast.save_pretrained(save_dir)
    return fast


def make_gpt2(tokenizer: PreTrainedTokenizerFast, seed: int = 0, extra_rows: int = 0) -> GPT2LMHeadModel:
    """A 2-layer random GPT-2 over `tokenizer` (optionally with padding rows in the head, like Qwen)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer) + extra_rows, n_embd=32, n_layer=2, n_head=2, n_positions=512,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).eval()


def make_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama over `tokenizer` (a different architecture and hidden size than `make_gpt2`)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


def save_checkpoint(model, tokenizer, path: str | Path) -> str:
    """Save like `dwakd train` does: model + tokenizer in one directory."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_jsonl(path: str | Path, rows: list[dict]) -> str:
    """Write rows as JSONL and return the path."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def small_test_set(n: int = 5, list_refs: bool = False) -> list[dict]:
    """`n` MiniLLM-style rows with prompts of different lengths; list references when `list_refs`."""
    rows = []
    for i in range(n):
        instruction = "Name the capital of France." + " Then explain why." * i
        output = "Paris is the capital of France."
        rows.append({"instruction": instruction, "input": "", "output": [output, "Paris."] if list_refs else output})
    return rows
