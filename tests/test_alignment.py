"""Token tables, the MinED vocabulary map, edit-distance DTW and exact alignment against naive references."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from _baseline_helpers import (
    encode,
    naive_dtw,
    naive_exact_pairs,
    naive_levenshtein,
    naive_vocab_map,
    student_tokenizer,
    teacher_tokenizer,
)

from dwakd.alignment.dtw import dtw_path, edit_distance_matrix, single_matches
from dwakd.alignment.exact import exact_offset_alignment, exact_string_alignment
from dwakd.alignment.token_strings import TokenTable, token_table
from dwakd.alignment.vocab_map import build_vocab_map, load_or_build_vocab_map
from dwakd.methods.base import TokenView

# ---------------------------------------------------------------- naive references (test-only, plain Python)


def naive_string_pairs(teacher: list[str], student: list[str]) -> list[tuple[int, int]]:
    """Pairs whose preceding text and own text are equal (well defined when both lists spell the same text)."""
    pre_t = ["".join(teacher[:i]) for i in range(len(teacher))]
    pre_s = ["".join(student[:j]) for j in range(len(student))]
    return [(i, j) for i in range(len(teacher)) for j in range(len(student))
            if pre_t[i] == pre_s[j] and teacher[i] == student[j]]


# ---------------------------------------------------------------- token tables


def test_token_table_decodes_markers(gpt2_tokenizer, qwen_tokenizer):
    g = token_table(gpt2_tokenizer)
    assert g.kind == "byte_level" and len(g) == len(gpt2_tokenizer)
    assert g.data[gpt2_tokenizer.convert_tokens_to_ids("Ġthe")] == b" the"
    assert g.data[gpt2_tokenizer.eos_token_id] == b"<|endoftext|>" and g.special[gpt2_tokenizer.eos_token_id]
    q = token_table(qwen_tokenizer)
    for text in ["中国", " world", "é"]:
        ids = qwen_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert b"".join(q.data[i] for i in ids) == text.encode("utf-8")  # pieces concatenate to the text's bytes
    assert g.fingerprint() != q.fingerprint() and g.fingerprint() == token_table(gpt2_tokenizer).fingerprint()

    s = token_table(student_tokenizer())
    assert s.kind == "metaspace"
    ids = student_tokenizer()(" the lazy dog", add_special_tokens=False)["input_ids"]
    assert b"".join(s.data[i] for i in ids) == b" the lazy dog"


def test_token_table_byte_fallback_and_wordpiece():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(vocab={"▁the": 0, "<0x0A>": 1, "<0xC3>": 2, "x": 3}, merges=[], byte_fallback=True))
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    table = token_table(PreTrainedTokenizerFast(tokenizer_object=bpe))
    assert (table.kind, table.data) == ("metaspace", (b" the", b"\n", b"\xc3", b"x"))
    wp = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "play": 1, "##ing": 2}, unk_token="[UNK]"))
    wp.decoder = decoders.WordPiece()
    table = token_table(PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]"))
    assert table.kind == "wordpiece" and table.data[1:] == (b"play", b"ing") and table.special[0]
    assert table.stripped_strings() == ["[UNK]", "play", "ing"]


# ---------------------------------------------------------------- vocabulary map


def _random_table(rng: random.Random, size: int, eos: int | None) -> TokenTable:
    alphabet = b"abcAB \xc3\xa9"
    data = []
    for _ in range(size):
        length = rng.choice([0, 1, 1, 2, 2, 3, 4, 6, 9]) if len(data) else 1
        data.append(bytes(rng.choice(alphabet) for _ in range(length)))
    if eos is not None:
        data[eos] = b"<eos>" + bytes([rng.randrange(97, 100)])
    special = np.zeros(size, dtype=bool)
    if eos is not None:
        special[eos] = True
    return TokenTable(tuple(data), special, eos, "byte_level")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vocab_map_matches_brute_force(seed):
    rng = random.Random(seed)
    teacher = _random_table(rng, 140, eos=7)
    student = _random_table(rng, 60, eos=3)
    vmap = build_vocab_map(teacher, student)
    mapping, dist = naive_vocab_map(list(teacher.data), list(student.data), 7, 3)
    assert vmap.teacher_to_student.tolist() == mapping
    assert vmap.distance.tolist() == dist
    assert vmap.stats["distance_1"] > 0 and vmap.stats["brute_force"] > 0 and vmap.stats["lower_exact"] >= 0
    # student -> teacher: the mapped teacher with the smallest distance, then the lowest id
    s2t = vmap.student_to_teacher()
    for s in range(len(student)):
        onto = [(dist[t], t) for t in range(len(teacher)) if mapping[t] == s]
        assert s2t[s] == (min(onto)[1] if onto else -1)


def test_vocab_map_real_tiny_tokenizers_and_cache(tmp_path):
    t_tok, s_tok = teacher_tokenizer(), student_tokenizer()
    first = load_or_build_vocab_map(t_tok, s_tok, tmp_path)
    assert "cached" not in first.stats and len(list((tmp_path / "vocab_maps").glob("*.npz"))) == 1
    again = load_or_build_vocab_map(t_tok, s_tok, tmp_path)
    assert again.stats.get("cached") == 1.0
    assert np.array_equal(first.teacher_to_student, again.teacher_to_student)
    assert np.array_equal(first.distance, again.distance)
    # a different student vocabulary is a different cache entry
    load_or_build_vocab_map(t_tok, student_tokenizer(150), tmp_path)
    assert len(list((tmp_path / "vocab_maps").glob("*.npz"))) == 2
    # spot-check against brute force on real token strings ("Ġ" vs "▁" conventions)
    t_table, s_table = token_table(t_tok), token_table(s_tok)
    mapping, dist = naive_vocab_map(list(t_table.data), list(s_table.data), t_tok.eos_token_id, s_tok.eos_token_id)
    assert first.teacher_to_student.tolist() == mapping and first.distance.tolist() == dist
    # words with a leading space match exactly across the two conventions ("Ġfox" -> "▁fox")
    spaced = [t for t in range(len(t_table)) if t_table.data[t][:1] == b" " and len(t_table.data[t]) > 2]
    exact = [t for t in spaced if first.distance[t] == 0]
    assert len(exact) > 5
    assert all(s_table.data[first.teacher_to_student[t]] == t_table.data[t] for t in exact)
    assert all("▁" in s_tok.convert_ids_to_tokens(int(first.teacher_to_student[t])) for t in exact)


# ---------------------------------------------------------------- edit-distance DTW


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (4, 7), (9, 3), (12, 12)])
def test_dtw_path_matches_naive(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        cost = rng.integers(0, 3, size=shape).astype(float)  # small integers: many ties
        path = dtw_path(cost)
        assert [tuple(p) for p in path.tolist()] == naive_dtw(cost.tolist())
        for axis, size in ((0, shape[0]), (1, shape[1])):
            single = single_matches(path, size, axis)
            for k in range(size):
                partners = [int(p[1 - axis]) for p in path if p[axis] == k]
                assert single[k] == (partners[0] if len(partners) == 1 else -1)


def test_edit_distance_matrix_matches_naive():
    rows, cols = ["the", "", "caf\xc3\xa9", "Zurich"], ["th", "cafe", "", "zürich", "x"]
    got = edit_distance_matrix(rows, cols)
    assert got.tolist() == [[naive_levenshtein(a, b) for b in cols] for a in rows]


# ---------------------------------------------------------------- exact alignment


def _view(prompt_spans, response_spans, ids) -> tuple[list, list, list, list]:
    """(input ids, labels, input offsets, label offsets) of one sequence, laid out like the collator does."""
    full = prompt_spans + response_spans
    labels = list(ids[1:])
    for k in range(len(prompt_spans) - 1):
        labels[k] = -100
    return list(ids[:-1]), labels, full[:-1], full[1:]


def _batch(rows) -> TokenView:
    width = max(len(r[0]) for r in rows)

    def pad(seq, value):
        return [list(s) + [value] * (width - len(s)) for s in seq]

    return TokenView(torch.tensor(pad([r[0] for r in rows], 0)),
                     torch.tensor(pad([[1] * len(r[0]) for r in rows], 0)),
                     torch.tensor(pad([r[1] for r in rows], -100)),
                     torch.tensor(pad([r[2] for r in rows], (-1, -1))),
                     torch.tensor(pad([r[3] for r in rows], (-1, -1))))


def test_exact_offset_alignment_hand_made():
    # text "P:ab cd é!" + EOS; "é" is split over two byte tokens on the student side only
    s_rows = [_view([(0, 2)], [(2, 4), (4, 7), (7, 8), (8, 9), (8, 9), (9, 10), (10, 10)], range(8)),
              _view([(0, 1)], [(2, 3), (3, 4), (4, 4)], range(4))]  # prompt cut before the response: gap at 1..2
    t_rows = [_view([(0, 1), (1, 2)], [(2, 3), (3, 4), (4, 7), (7, 9), (9, 10), (10, 10)], range(8)),
              _view([(0, 2)], [(2, 3), (3, 4), (4, 4)], range(4))]
    student, teacher = _batch(s_rows), _batch(t_rows)
    s2t, t2s = exact_offset_alignment(student.labels, student.label_offsets, student.input_offsets,
                                      teacher.labels, teacher.label_offsets, teacher.input_offsets)
    # sequence 0: " cd" (s1↔t3), "!" (s5↔t5), EOS (s6↔t6); nothing else covers the same text
    # sequence 1: "a", "b", EOS all align although the student's prompt ends one character early
    expected = {(0, 1, 3), (0, 5, 5), (0, 6, 6), (1, 0, 0), (1, 1, 1), (1, 2, 2)}
    got = {(b, i, int(s2t[b, i])) for b in range(2) for i in range(s2t.shape[1]) if s2t[b, i] >= 0}
    assert got == expected == naive_exact_pairs(student, teacher)
    back = {(b, int(t2s[b, j]), j) for b in range(2) for j in range(t2s.shape[1]) if t2s[b, j] >= 0}
    assert back == expected


@pytest.mark.parametrize("extra_pad", [0, 5])
def test_exact_offset_alignment_real_tokenizers_matches_naive(extra_pad):
    student = encode(student_tokenizer(), extra_pad=extra_pad)
    teacher = encode(teacher_tokenizer())
    s2t, t2s = exact_offset_alignment(student.labels, student.label_offsets, student.input_offsets,
                                      teacher.labels, teacher.label_offsets, teacher.input_offsets)
    got = {(b, i, int(s2t[b, i])) for b in range(s2t.shape[0]) for i in range(s2t.shape[1]) if s2t[b, i] >= 0}
    assert got == naive_exact_pairs(student, teacher) and len(got) > 10
    assert all(student.labels[b, i] != -100 and teacher.labels[b, j] != -100 for b, i, j in got)


def test_exact_string_alignment_matches_naive():
    rng = random.Random(0)
    for _ in range(30):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(1, 25)))

        def split(s):
            cuts = sorted(rng.sample(range(1, len(s)), rng.randint(0, max(0, len(s) - 1)))) if len(s) > 1 else []
            return [s[a:b] for a, b in zip([0] + cuts, cuts + [len(s)])]

        teacher, student = split(text), split(text)
        assert exact_string_alignment(teacher, student) == naive_string_pairs(teacher, student)
    # both EOS align although their strings differ
    assert exact_string_alignment(["ab", "<e>"], ["a", "b", "</s>"], [False, True], [False, False, True]) == [(1, 2)]


def test_offsets_and_strings_agree_on_plain_text(gpt2_tokenizer, qwen_tokenizer):
    examples = [("Question: what is it?\n", "It is a small test of the alignment between two tokenizers."),
                ("Q:\n", "Distillation transfers knowledge; students learn from teachers quickly.")]
    student, teacher = encode(gpt2_tokenizer, examples), encode(qwen_tokenizer, examples)
    s2t, _ = exact_offset_alignment(student.labels, student.label_offsets, student.input_offsets,
                                    teacher.labels, teacher.label_offsets, teacher.input_offsets)
    g, q = token_table(gpt2_tokenizer).stripped_strings(), token_table(qwen_tokenizer).stripped_strings()
    for b in range(2):
        s_pos = student.label_mask[b].nonzero().squeeze(1).tolist()
        t_pos = teacher.label_mask[b].nonzero().squeeze(1).tolist()
        s_ids, t_ids = student.labels[b, s_pos].tolist(), teacher.labels[b, t_pos].tolist()
        pairs = exact_string_alignment([q[i] for i in t_ids], [g[i] for i in s_ids],
                                       [i == qwen_tokenizer.eos_token_id for i in t_ids],
                                       [i == gpt2_tokenizer.eos_token_id for i in s_ids])
        by_strings = {(s_pos[j], t_pos[i]) for i, j in pairs}
        by_offsets = {(i, int(s2t[b, i])) for i in s_pos if s2t[b, i] >= 0}
        assert by_offsets == by_strings and len(by_offsets) >= len(s_pos) - 3
