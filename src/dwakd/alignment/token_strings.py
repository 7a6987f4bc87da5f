"""What text each token id stands for, as raw bytes: the common ground for comparing two vocabularies.

Token strings as tokenizers store them cannot be compared across tokenizers: byte-level BPE (GPT-2, Qwen,
Llama-3) writes a space as "Ġ" and every non-ASCII byte as a stand-in character; SentencePiece (Llama-2,
Mistral, TinyLlama) writes a space as "▁" and raw bytes as "<0xNN>"; WordPiece marks continuations with "##".
`token_table` turns every id into the bytes it decodes to, so "Ġthe", "▁the" and " the" all become b" the" and
a byte-level token holding half of a UTF-8 character keeps exactly that half.

Everything is computed once per tokenizer (about 0.3 s for 150k tokens) and never at training time.

Choices (where the MinED paper is silent; docs/methods.md#63-mined):
- The markers are *decoded* (to the space they stand for), not deleted, so " the" and "the" stay different
  tokens for the vocabulary map; `stripped_strings` deletes the spaces for the sequence alignment cost, which
  is what the MinED reference does with its `replace("Ġ", "")`.
- WordPiece word-initial tokens carry no space (the tokenizer does not record one); "##" is removed.
- Added/special tokens (EOS, "<|im_start|>") stand for their literal content.
- Edit distances are over bytes (each byte one symbol), as the reference's byte-level strings are.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE stand-in character of each byte (GPT-2's table), inverted: character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = dict(zip(printable, printable))
    shift = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = 256 + shift  # unprintable bytes are shifted past Latin-1
            shift += 1
    return {chr(code): byte for byte, code in chars.items()}


def _decoder_kind(tokenizer: Any) -> tuple[str, str]:
    """("byte_level" | "metaspace" | "wordpiece" | "other", continuation prefix) from a fast tokenizer's decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "other", ""
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {p.get("type") for p in parts}
    if "ByteLevel" in types:
        return "byte_level", ""
    if "Metaspace" in types or any(
        p.get("type") == "Replace" and p.get("pattern", {}).get("String") == "▁" for p in parts
    ):
        return "metaspace", ""
    if "WordPiece" in types:
        prefix = next(p.get("prefix", "##") for p in parts if p.get("type") == "WordPiece")
        return "wordpiece", prefix
    return "other", ""


def _token_to_bytes(token: str, kind: str, prefix: str, alphabet: dict[str, int], tokenizer: Any) -> bytes:
    """Bytes one (non-special) token string decodes to, under the tokenizer's decoding scheme."""
    if kind == "byte_level":
        try:
            return bytes(alphabet[c] for c in token)
        except KeyError:  # a token outside the byte alphabet (hand-added): take it literally
            return token.encode("utf-8")
    if kind == "metaspace":
        fallback = _BYTE_FALLBACK.match(token)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        return token.replace("▁", " ").encode("utf-8")
    if kind == "wordpiece":
        return (token[len(prefix):] if prefix and token.startswith(prefix) else token).encode("utf-8")
    return tokenizer.convert_tokens_to_string([token]).encode("utf-8")


@dataclass(frozen=True)
class TokenTable:
    """Per id of one tokenizer: the bytes it stands for and whether it is a special (added) token."""

    data: tuple[bytes, ...]  # data[i]: text bytes of token i (b"" for ids the tokenizer does not define)
    special: np.ndarray  # (vocab,) bool
    eos_id: int | None
    kind: str  # decoding scheme detected: byte_level, metaspace, wordpiece, other

    def __len__(self) -> int:
        return len(self.data)

    def fingerprint(self) -> str:
        """sha256 of the table's content: equal for tokenizers that decode every id identically."""
        digest = hashlib.sha256()
        digest.update(f"{len(self.data)}|{self.eos_id}|".encode())
        for item, is_special in zip(self.data, self.special.tolist()):
            digest.update(len(item).to_bytes(4, "little"))
            digest.update(b"\x01" if is_special else b"\x00")
            digest.update(item)
        return digest.hexdigest()

    def latin1(self) -> list[str]:
        """Each token's bytes as a str of one character per byte (for fast edit distances over bytes)."""
        return [item.decode("latin-1") for item in self.data]

    def stripped_strings(self) -> list[str]:
        """Per id, bytes as latin-1 str with every space removed (the MinED alignment cost compares these)."""
        return [item.replace(b" ", b"").decode("latin-1") for item in self.data]


def token_table(tokenizer: Any, size: int | None = None) -> TokenTable:
    """The `TokenTable` of a Hugging Face tokenizer for ids 0..size-1 (default: every id, `len(tokenizer)`)."""
    size = len(tokenizer) if size is None else size
    kind, prefix = _decoder_kind(tokenizer)
    alphabet = byte_level_alphabet()
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = set(getattr(tokenizer, "all_special_tokens", [])) | set(tokenizer.get_added_vocab())
    data: list[bytes] = []
    special = np.zeros(size, dtype=bool)
    for i, token in enumerate(tokens):
        if token is None:
            data.append(b"")
        elif token in added:
            special[i] = True
            data.append(token.encode("utf-8"))
        else:
            data.append(_token_to_bytes(token, kind, prefix, alphabet, tokenizer))
    return TokenTable(tuple(data), special, getattr(tokenizer, "eos_token_id", None), kind)
