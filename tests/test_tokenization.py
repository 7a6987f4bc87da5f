"""Dual tokenization on real vocabularies (Qwen, GPT-2): labels, offsets and truncation against independent checks."""

from __future__ import annotations

from itertools import pairwise

import pytest
from _token_bytes import expected_spans

from dwakd.data import DistillationCollator, InstructionRecord, build_prompt, encode_records, pad_sequences
from dwakd.data.collator import collate_side
from dwakd.data.tokenization import IGNORE_INDEX

TEXTS = [
    ("Translate to French: naïve café", "Le café naïf coûte 3,50 € — très cher! 日本語も少し。"),
    ("Write code", "def f(x):\n    return x ** 2  # square\n\n\n\tprint(f(12345))"),
    ("Numbers", "In 1999, 2,000,000 people saw 3.14159 and 42nd street…   spaces   here"),
    ("Emoji", "I ❤️ 🦀 Rust! 👩‍💻\r\nDone."),
]


def records():
    return [InstructionRecord(build_prompt(i), (r,)) for i, r in TEXTS]


def sides(student, teacher):
    examples, stats = encode_records(records(), student, teacher, show_progress=False)
    return examples, stats


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_labels_match_independent_retokenization(which, gpt2_tokenizer, qwen_tokenizer):
    examples, stats = sides(gpt2_tokenizer, qwen_tokenizer)
    tokenizer = gpt2_tokenizer if which == "student" else qwen_tokenizer
    assert stats.examples == len(TEXTS) and not stats.dropped
    for example, (instruction, response) in zip(examples, TEXTS):
        side = getattr(example, which)
        prompt = build_prompt(instruction)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
        full = prompt_ids + response_ids
        assert side.input_ids == full[:-1]
        expected = [IGNORE_INDEX] * (len(prompt_ids) - 1) + response_ids
        assert side.labels == expected
        # the response decodes back to the original text (no BOS was added anywhere)
        label_ids = [t for t in side.labels if t != IGNORE_INDEX]
        assert tokenizer.decode(label_ids[:-1]) == response and label_ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_offsets_point_into_full_text(which, gpt2_tokenizer, qwen_tokenizer):
    """Every span exact, from the tokens' bytes in the rank files: a piece of an emoji or CJK character split
    between tokens spans that whole character (neighbouring pieces share it); EOS has the empty span at the end."""
    examples, _ = sides(gpt2_tokenizer, qwen_tokenizer)
    tokenizer = gpt2_tokenizer if which == "student" else qwen_tokenizer
    vocab = "gpt2" if which == "student" else "qwen"
    shared = 0
    for example, (instruction, response) in zip(examples, TEXTS):
        side = getattr(example, which)
        prompt = build_prompt(instruction)
        full = prompt + response
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        response_ids = tokenizer.encode(response, add_special_tokens=False)
        want = (expected_spans(prompt_ids, prompt, vocab)
                + expected_spans(response_ids, response, vocab, start=len(prompt)) + [(len(full), len(full))])
        assert side.input_ids + side.labels[-1:] == prompt_ids + response_ids + [tokenizer.eos_token_id]
        assert side.input_offsets + side.label_offsets[-1:] == want
        assert side.label_offsets == want[1:]  # labels are the inputs shifted by one position
        response_spans = want[len(prompt_ids):-1]
        shared += sum(a == b for a, b in pairwise(response_spans))
    assert shared >= 2  # the texts really split characters between tokens on this side


def test_the_two_sides_really_differ(gpt2_tokenizer, qwen_tokenizer):
    examples, _ = sides(gpt2_tokenizer, qwen_tokenizer)
    boundaries = lambda side: {o for t, o in zip(side.labels, side.label_offsets) if t != IGNORE_INDEX}  # noqa: E731
    assert any(boundaries(e.student) != boundaries(e.teacher) for e in examples)


def test_truncation_counted(gpt2_tokenizer, qwen_tokenizer):
    recs = [InstructionRecord("word " * 300, ("answer " * 400,)), InstructionRecord("short", ("ok",))]
    examples, stats = encode_records(recs, gpt2_tokenizer, qwen_tokenizer, max_prompt_length=32, max_length=64,
                                     show_progress=False)
    assert stats.prompt_truncated == {"student": 1, "teacher": 1}
    assert stats.response_truncated == {"student": 1, "teacher": 1}
    long_student = examples[0].student
    assert len(long_student.input_ids) == 63  # 64 tokens, shifted
    assert long_student.labels.count(IGNORE_INDEX) == 31  # 32 prompt tokens -> 31 masked
    assert "1 prompts cut" in stats.summary()


def test_tightest_lengths_keep_one_response_token(gpt2_tokenizer):
    recs = [InstructionRecord("x " * 50, ("lost words here",), source="f.jsonl", line=9)]
    examples, stats = encode_records(recs, gpt2_tokenizer, max_prompt_length=20, max_length=21,
                                     show_progress=False)
    labels = examples[0].student.labels
    assert labels[:19] == [IGNORE_INDEX] * 19
    assert labels[19] == gpt2_tokenizer.encode("lost words here", add_special_tokens=False)[0]
    assert sum(t != IGNORE_INDEX for t in labels) == 1 and not stats.dropped
    with pytest.raises(ValueError, match="must be below"):
        encode_records(recs, gpt2_tokenizer, max_prompt_length=30, max_length=30, show_progress=False)


def test_collator_pads_right_and_left(gpt2_tokenizer, qwen_tokenizer):
    examples, _ = sides(gpt2_tokenizer, qwen_tokenizer)
    right = DistillationCollator(gpt2_tokenizer.pad_token_id, qwen_tokenizer.pad_token_id)(examples)
    left = DistillationCollator(gpt2_tokenizer.pad_token_id, qwen_tokenizer.pad_token_id, padding_side="left")(examples)
    for prefix, attr in (("", "student"), ("teacher_", "teacher")):
        for b, example in enumerate(examples):
            side = getattr(example, attr)
            n = len(side.input_ids)
            width = right[f"{prefix}input_ids"].shape[1]
            assert right[f"{prefix}input_ids"][b, :n].tolist() == side.input_ids
            assert right[f"{prefix}attention_mask"][b].tolist() == [1] * n + [0] * (width - n)
            assert right[f"{prefix}labels"][b, n:].eq(IGNORE_INDEX).all()
            assert right[f"{prefix}label_offsets"][b, n:].eq(-1).all()
            assert left[f"{prefix}input_ids"][b, width - n:].tolist() == side.input_ids
            assert left[f"{prefix}attention_mask"][b].tolist() == [0] * (width - n) + [1] * n
            assert left[f"{prefix}input_offsets"][b, width - n:].tolist() == [list(o) for o in side.input_offsets]
    assert right["labels"].ne(IGNORE_INDEX).sum() == sum(
        sum(t != IGNORE_INDEX for t in e.student.labels) for e in examples)


def test_pad_sequences_multiple_of_and_errors():
    out = pad_sequences([[1, 2, 3], [4]], 0, "right", multiple_of=8)
    assert out.shape == (2, 8) and out[1].tolist() == [4] + [0] * 7
    with pytest.raises(ValueError):
        pad_sequences([[1]], 0, "middle")
    assert collate_side([], 0)["input_ids"].shape == (0, 0)


def test_tokenizer_without_pad_gets_one():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dwakd.tokenizers import ensure_pad_token

    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2, "</s>": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    assert tok.pad_token is None
    assert ensure_pad_token(tok).pad_token_id == 3
    no_eos = PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.raises(ValueError, match="no EOS token"):
        ensure_pad_token(no_eos)
