"""Two genuinely different tokenizers for the demo, trained on the suite with the `tokenizers` library.

Teacher: byte-level BPE (GPT-2/Qwen style: the space belongs to the next word, digits one by one).
Student: WordPiece (BERT style: words split on whitespace and punctuation, "##" continuation pieces, whole
numbers, greedy longest-match), with a smaller vocabulary, so rarer words break into different pieces.
Both are deterministic: the same corpus and settings give byte-identical tokenizer files in every process.
Both are saved as `PreTrainedTokenizerFast` directories with an EOS token, as `dwakd.tokenizers` requires.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import PreTrainedTokenizerFast

TEACHER_EOS = "<|endoftext|>"
STUDENT_EOS, STUDENT_PAD, STUDENT_UNK = "[EOS]", "[PAD]", "[UNK]"


@dataclass(frozen=True)
class TokenizerSettings:
    """Vocabulary sizes (upper bounds: a trainer stops early when the corpus has no more merges to offer)."""

    teacher_vocab: int = 4000
    student_vocab: int = 1500
    min_frequency: int = 2
    version: str = "2"  # bump when the recipes below change

    def fingerprint(self) -> str:
        """Short hash of these settings."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def train_teacher_tokenizer(texts: Sequence[str], settings: TokenizerSettings) -> PreTrainedTokenizerFast:
    """Byte-level BPE with digits split one by one."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=settings.teacher_vocab, min_frequency=settings.min_frequency,
                                  special_tokens=[TEACHER_EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=TEACHER_EOS, pad_token=TEACHER_EOS)


def train_student_tokenizer(texts: Sequence[str], settings: TokenizerSettings) -> PreTrainedTokenizerFast:
    """WordPiece on whitespace/punctuation-split words (cased, numbers kept whole), vocabulary learned by BPE.

    The library's `WordPieceTrainer` (a BPE trainer with a "##" prefix) breaks ties between equally frequent
    pairs in hash order, so it returns a different vocabulary in every process. Instead a plain BPE trainer
    (deterministic) learns the pieces on the same pre-tokenized words; every piece then enters the WordPiece
    vocabulary in the form it takes in the corpus (word-initial as is, inside a word with "##"), most frequent
    first, with the whole printable alphabet in both forms so no text maps to [UNK].
    """
    normalizer = normalizers.NFC()
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    alphabet = sorted(set(string.printable) - set(string.whitespace))
    bpe = Tokenizer(models.BPE(unk_token=STUDENT_UNK))
    bpe.normalizer, bpe.pre_tokenizer = normalizer, pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=settings.student_vocab, min_frequency=settings.min_frequency,
                                  special_tokens=[STUDENT_PAD, STUDENT_UNK, STUDENT_EOS], initial_alphabet=alphabet,
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    words = Counter(word for text in texts
                    for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    pieces: Counter[str] = Counter()
    for word, count in words.items():
        for position, token in enumerate(bpe.model.tokenize(word)):
            pieces[token.value if position == 0 else "##" + token.value] += count
    vocab = [STUDENT_PAD, STUDENT_UNK, STUDENT_EOS, *alphabet, *("##" + c for c in alphabet)]
    known = set(vocab)
    ranked = sorted((p for p in pieces if p not in known), key=lambda p: (-pieces[p], p))
    vocab += ranked[: max(0, settings.student_vocab - len(vocab))]
    tokenizer = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate(vocab)}, unk_token=STUDENT_UNK,
                                           max_input_chars_per_word=100))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens([STUDENT_PAD, STUDENT_UNK, STUDENT_EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=STUDENT_EOS, pad_token=STUDENT_PAD,
                                   unk_token=STUDENT_UNK)


def train_tokenizers(texts: Sequence[str], settings: TokenizerSettings, out_dir: str | Path) -> dict[str, Path]:
    """Train both tokenizers and save them under out_dir/{teacher,student}; returns the two directories."""
    out_dir = Path(out_dir)
    paths = {}
    for role, train in (("teacher", train_teacher_tokenizer), ("student", train_student_tokenizer)):
        tokenizer = train(texts, settings)
        path = out_dir / role
        tokenizer.save_pretrained(str(path))
        paths[role] = path
    return paths


def boundary_agreement(teacher, student, texts: Sequence[str]) -> dict[str, float]:
    """How differently the two tokenizers cut the same texts.

    tokens_per_word: tokens per whitespace word on each side; boundary_f1: F1 between the two sets of
    token end offsets (ignoring whitespace-only differences: an end is trimmed of trailing spaces and a
    start of leading ones); same_token_share: share of student tokens whose exact character span is also a
    teacher token's span.
    """
    words = sum(len(t.split()) for t in texts)
    n_t = n_s = shared_ends = ends_t = ends_s = same_spans = 0
    for text in texts:
        spans = {}
        for role, tok in (("t", teacher), ("s", student)):
            offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            spans[role] = {_trim(text, s, e) for s, e in offsets}
        ends = {r: {e for _, e in spans[r]} for r in spans}
        n_t += len(spans["t"])
        n_s += len(spans["s"])
        ends_t += len(ends["t"])
        ends_s += len(ends["s"])
        shared_ends += len(ends["t"] & ends["s"])
        same_spans += len(spans["t"] & spans["s"])
    precision, recall = shared_ends / max(ends_s, 1), shared_ends / max(ends_t, 1)
    return {
        "teacher_tokens_per_word": round(n_t / max(words, 1), 3),
        "student_tokens_per_word": round(n_s / max(words, 1), 3),
        "boundary_f1": round(2 * precision * recall / max(precision + recall, 1e-9), 3),
        "same_token_share": round(same_spans / max(n_s, 1), 3),
    }


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end
