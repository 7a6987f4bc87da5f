"""Sampled generation: per-item reproducibility, batch invariance, EOS handling, padding rows, resume after a stop."""

from __future__ import annotations

import json

import pytest
import torch
from _eval_helpers import make_gpt2, make_tokenizer, small_test_set
from torch import nn

from dwakd.data.records import record_from_dict
from dwakd.evaluation.generation import (
    GenerationSettings,
    decode_response,
    encode_prompts,
    generate_batch,
    generate_seed_file,
    item_seed,
    read_generation_file,
)

SETTINGS = GenerationSettings(max_new_tokens=24, batch_size=3)


def _add_head_bias(model, bias: torch.Tensor):
    """Give the (tied, bias-free) GPT-2 head a bias, to steer what gets sampled."""
    model.lm_head.bias = nn.Parameter(bias)
    return model


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tokenizer()
    model = make_gpt2(tokenizer, seed=1)
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer.eos_token_id] = 3.0  # EOS about 1 in 10 per step: rows finish at different steps
    _add_head_bias(model, bias)
    records = [record_from_dict(r, "mem", i) for i, r in enumerate(small_test_set(7))]
    return tokenizer, model, records


def _generate(model, tokenizer, records, seed, settings):
    ids = encode_prompts(tokenizer, records, settings.max_prompt_length)
    out = []
    for start in range(0, len(records), settings.batch_size):
        idx = list(range(start, min(start + settings.batch_size, len(records))))
        out += generate_batch(model, tokenizer, [ids[i] for i in idx], [item_seed(seed, i) for i in idx], settings)
    return out


def test_same_seed_same_responses_any_batch_size(setup):
    tokenizer, model, records = setup
    batched = _generate(model, tokenizer, records, 10, SETTINGS)
    one_by_one = _generate(model, tokenizer, records, 10, GenerationSettings(max_new_tokens=24, batch_size=1))
    again = _generate(model, tokenizer, records, 10, SETTINGS)
    other_seed = _generate(model, tokenizer, records, 20, SETTINGS)
    assert batched == one_by_one == again
    assert [r[0] for r in batched] != [r[0] for r in other_seed]
    # Rows stop at different steps (some at EOS, some at the budget): the batch mixes finished and running rows.
    lengths = [n for _, n, _ in batched]
    assert any(stopped for *_, stopped in batched) and len(set(lengths)) > 1
    assert all(n == SETTINGS.new_tokens for _, n, stopped in batched if not stopped)


def test_prompt_cut_to_first_tokens_and_no_bos(setup):
    tokenizer, _, records = setup
    ids = encode_prompts(tokenizer, records, 20)
    full = [tokenizer(r.prompt, add_special_tokens=False)["input_ids"] for r in records]
    assert all(len(i) == 20 and i == f[:20] for i, f in zip(ids, full))


def test_padding_rows_of_the_head_are_never_sampled():
    tokenizer = make_tokenizer()
    model = make_gpt2(tokenizer, seed=2, extra_rows=5)  # head has 5 rows beyond the tokenizer (like Qwen)
    bias = torch.zeros(len(tokenizer) + 5)
    bias[len(tokenizer):] = 50.0  # unmasked, these rows would win every step
    _add_head_bias(model, bias)
    records = [record_from_dict(r) for r in small_test_set(2)]
    settings = GenerationSettings(max_new_tokens=8, batch_size=2)
    ids = encode_prompts(tokenizer, records, 256)
    captured = {}
    original = model.generate

    def spy(*args, **kwargs):
        captured["sequences"] = original(*args, **kwargs)
        return captured["sequences"]

    model.generate = spy
    generate_batch(model, tokenizer, ids, [1, 2], settings)
    new_tokens = captured["sequences"][:, max(len(i) for i in ids):]
    assert new_tokens.numel() > 0 and int(new_tokens.max()) < len(tokenizer)


def test_equal_length_prompts_generate_without_the_dropped_mask_warning(setup):
    """A batch of equal-length prompts has an all-ones mask, which `generate` drops, then pads the rows that stopped
    at EOS: GPT-2 would warn "pass an `attention_mask`" on every demo run. generate_batch silences that false alarm
    (the responses equal one-by-one generation), while the same warning for a real unmasked forward still shows
    afterwards, and the model's config keeps its pad id."""
    import logging

    tokenizer, _, records = setup
    model = make_gpt2(tokenizer, seed=1)
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer.eos_token_id] = 3.0
    _add_head_bias(model, bias)
    model.config.pad_token_id = tokenizer.pad_token_id  # as a trained checkpoint's config has it
    same = [records[0]] * 6  # one prompt, six item seeds: rows stop at different steps
    ids = encode_prompts(tokenizer, same, SETTINGS.max_prompt_length)
    seeds = [item_seed(10, i) for i in range(6)]
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    log, keep = logging.getLogger("transformers.modeling_utils"), Keep()
    log.addHandler(keep)
    try:
        clear = getattr(logging.Logger.warning_once, "cache_clear", None)  # transformers warns once per process
        if clear:
            clear()
        batched = generate_batch(model, tokenizer, ids, seeds, GenerationSettings(max_new_tokens=24, batch_size=6))
        assert not [m for m in messages if "attention_mask" in m]
        assert model.config.pad_token_id == tokenizer.pad_token_id is not None
        padded = torch.tensor([[tokenizer.pad_token_id] + ids[0]])
        model(input_ids=padded)  # a forward on padding without a mask: the warning is not silenced outside
        assert [m for m in messages if "attention_mask" in m]
    finally:
        log.removeHandler(keep)
    one_by_one = [generate_batch(model, tokenizer, [i], [s], SETTINGS)[0] for i, s in zip(ids, seeds)]
    assert batched == one_by_one and len({n for _, n, _ in batched}) > 1


def test_decode_cuts_at_eos_and_strips():
    tokenizer = make_tokenizer()
    eos = tokenizer.eos_token_id
    body = tokenizer("  Paris is the capital ", add_special_tokens=False)["input_ids"]
    tail = tokenizer(" of France", add_special_tokens=False)["input_ids"]
    text, n, stopped = decode_response(tokenizer, body + [eos] + tail + [eos])
    assert (text, n, stopped) == ("Paris is the capital", len(body), True)
    text, n, stopped = decode_response(tokenizer, body)
    assert (text, n, stopped) == ("Paris is the capital", len(body), False)


def test_resume_after_interruption_gives_identical_file(setup, tmp_path):
    tokenizer, model, records = setup
    full = tmp_path / "full" / "seed10.jsonl"
    generate_seed_file(model, tokenizer, records, 10, full, SETTINGS, progress=False)

    resumed = tmp_path / "resumed" / "seed10.jsonl"
    calls = []

    def interrupt(done: int) -> None:
        calls.append(done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_seed_file(model, tokenizer, records, 10, resumed, SETTINGS, progress=False, on_batch_done=interrupt)
    assert calls == [SETTINGS.batch_size] and len(read_generation_file(resumed)) == SETTINGS.batch_size
    with resumed.open("a", encoding="utf-8") as handle:  # a crash in the middle of an append
        handle.write('{"index": 6, "respo')
    generated = []
    rows = generate_seed_file(model, tokenizer, records, 10, resumed, SETTINGS, progress=False,
                              on_batch_done=generated.append)
    assert generated[-1] == len(records) and len(generated) == -(-(len(records) - SETTINGS.batch_size) // 3)
    assert resumed.read_bytes() == full.read_bytes()
    lines = [json.loads(x) for x in full.read_text().splitlines()]
    assert [r["index"] for r in lines] == list(range(len(records))) and lines == rows
    assert {"instruction", "references", "response"} <= set(lines[0])

    # A rerun of a finished file generates nothing and leaves it unchanged.
    generate_seed_file(model, tokenizer, records, 10, resumed, SETTINGS, progress=False,
                       on_batch_done=lambda n: pytest.fail("nothing should be generated"))
    assert resumed.read_bytes() == full.read_bytes()


def test_resume_refuses_a_changed_test_set(setup, tmp_path):
    tokenizer, model, records = setup
    path = tmp_path / "seed10.jsonl"
    generate_seed_file(model, tokenizer, records[:2], 10, path, SETTINGS, progress=False)
    changed = [records[1], records[0]]
    with pytest.raises(ValueError, match="different prompt"):
        generate_seed_file(model, tokenizer, changed, 10, path, SETTINGS, progress=False)
