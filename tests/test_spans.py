"""Shared pieces of SRA and MTA: spans from offsets, centres of mass, token weights, relational losses, layer pairs,
text units. Each against a naive reference (loops, float64) or a hand-worked case."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _kd_helpers import one_thread
from _repr_helpers import (
    naive_centre,
    naive_last_token_attention,
    naive_self_similarity,
    naive_spans,
    naive_structure,
    naive_weighted_distance,
    response_positions,
)

from dwakd.data import DistillationCollator, InstructionRecord, encode_records, load_records
from dwakd.data.units import token_unit_ids
from dwakd.interface import TokenView
from dwakd.modules.layers import (
    check_layer_pairs,
    check_pairs_fit,
    layer_width,
    num_layers,
    proportional_pairs,
    top_pairs,
)
from dwakd.modules.relational import (
    last_token_attention,
    self_similarity_weights,
    structure_loss,
    weighted_cosine_distance,
)
from dwakd.modules.spans import coterminal_span_ids, pool, response_input_mask, token_weighted_mean, unit_token_counts
from dwakd.options import OptionError

ROOT = Path(__file__).resolve().parents[1]
VIEW_KEYS = ("input_ids", "attention_mask", "labels", "input_offsets", "label_offsets")
# multi-byte characters (split into several byte-level tokens with one shared character span), digits, emoji
CRAFTED = [
    InstructionRecord("### Instruction:\nTranslate.\n\n### Response:\n",
                      ("Café au lait in Zürich costs 12345 francs 🙂 — 蒸馏 works!",)),
    InstructionRecord("### Instruction:\nSay hi.\n\n### Response:\n", ("Hi",)),
]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def views(records, student_tok, teacher_tok, max_length=512) -> tuple[TokenView, TokenView]:
    examples, _ = encode_records(records, student_tok, teacher_tok, max_prompt_length=max_length // 2,
                                 max_length=max_length, show_progress=False)
    batch = DistillationCollator(student_tok.pad_token_id, teacher_tok.pad_token_id)(examples)
    return (TokenView(*(batch[k] for k in VIEW_KEYS)), TokenView(*(batch[f"teacher_{k}"] for k in VIEW_KEYS)))


@pytest.fixture(scope="module")
def real_views(gpt2_tokenizer, qwen_tokenizer):
    records = load_records(ROOT / "data" / "dolly-tiny" / "train.jsonl")[:6] + CRAFTED
    return views(records, gpt2_tokenizer, qwen_tokenizer), records


def test_spans_match_naive_reference_on_real_tokenizations(real_views) -> None:
    """GPT-2 and Qwen vocabularies on Dolly answers and multi-byte text: span ids equal a loop over offsets."""
    (student, teacher), _ = real_views
    s_ids, t_ids, counts = coterminal_span_ids(student, teacher)
    for b in range(student.input_ids.shape[0]):
        s_ref, t_ref, count = naive_spans(student, teacher, b)
        assert int(counts[b]) == count > 0
        for ids, ref in ((s_ids, s_ref), (t_ids, t_ref)):
            got = {i: int(ids[b, i]) for i in range(ids.shape[1]) if int(ids[b, i]) >= 0}
            assert got == ref


def test_spans_cover_the_same_text_on_both_sides(real_views) -> None:
    """Span k ends at the same character on both sides, spans are in text order, every response token is in one."""
    (student, teacher), records = real_views
    s_ids, t_ids, counts = coterminal_span_ids(student, teacher)
    for b in range(student.input_ids.shape[0]):
        ends = []
        for view, ids in ((student, s_ids), (teacher, t_ids)):
            pos = response_positions(view, b)
            spans = [int(ids[b, i]) for i in pos]
            assert spans == sorted(spans) and -1 not in spans  # nothing truncated here: every token is in a span
            ends.append([max(int(view.input_offsets[b, i, 1]) for i in pos if int(ids[b, i]) == k)
                         for k in range(int(counts[b]))])
            assert set(spans) == set(range(int(counts[b])))  # each span has tokens on this side
        assert ends[0] == ends[1]
        text = records[b].prompt + records[b].response
        assert ends[0][-1] == len(text)  # the last span ends with the answer


def test_multibyte_characters_never_split_a_span(gpt2_tokenizer, qwen_tokenizer) -> None:
    """GPT-2 splits '🙂' and '蒸' into byte tokens sharing one character span: no boundary falls between them."""
    (student, teacher) = views(CRAFTED[:1], gpt2_tokenizer, qwen_tokenizer)
    s_ids, _, _ = coterminal_span_ids(student, teacher)
    pos = response_positions(student, 0)
    shared = [(i, j) for i, j in zip(pos, pos[1:])
              if student.input_offsets[0, i].tolist() == student.input_offsets[0, j].tolist()]
    assert shared, "expected byte-level tokens that share a character span"
    for i, j in shared:
        assert int(s_ids[0, i]) == int(s_ids[0, j])


def hand_view(offsets: list[tuple[int, int]]) -> TokenView:
    """One sequence: a prompt token at position 0 (its label is the first response token), then response tokens."""
    length = len(offsets)
    ids = torch.arange(1, length + 1).unsqueeze(0)
    labels = torch.arange(2, length + 2).unsqueeze(0)  # every position valid: the last one predicts EOS
    off = torch.tensor([offsets])
    return TokenView(ids, torch.ones_like(ids), labels, off, off)


def test_overlapping_tokens_never_leave_a_boundary_between_them() -> None:
    """Text "P" + "abc". The student's tokens (1,3) and (2,4) overlap at char 2 (a byte-level split inside one
    character): its offset 3 is no token end, so the teacher's boundary at 3 does not split the text."""
    student = hand_view([(0, 1), (1, 3), (2, 4)])
    teacher = hand_view([(0, 1), (1, 3), (3, 4)])
    s_ids, t_ids, counts = coterminal_span_ids(student, teacher)
    assert s_ids.tolist() == [[-1, 0, 0]] and t_ids.tolist() == [[-1, 0, 0]] and counts.tolist() == [1]
    student = hand_view([(0, 1), (1, 2), (2, 4)])  # no overlap: boundaries at 2 and 4
    teacher = hand_view([(0, 1), (1, 2), (2, 3), (3, 4)])
    s_ids, t_ids, counts = coterminal_span_ids(student, teacher)
    assert s_ids.tolist() == [[-1, 0, 1]] and t_ids.tolist() == [[-1, 0, 1, 1]] and counts.tolist() == [2]
    for b_view in ((student, teacher),):
        s_ref, t_ref, count = naive_spans(*b_view, 0)
        assert count == 2 and s_ref == {1: 0, 2: 1} and t_ref == {1: 0, 2: 1, 3: 1}


def test_truncated_side_leaves_the_tail_out(gpt2_tokenizer, qwen_tokenizer) -> None:
    records = load_records(ROOT / "data" / "dolly-tiny" / "train.jsonl")[:2]
    student, _ = views(records, gpt2_tokenizer, qwen_tokenizer, max_length=64)
    _, teacher = views(records, gpt2_tokenizer, qwen_tokenizer, max_length=512)
    s_ids, t_ids, counts = coterminal_span_ids(student, teacher)
    for b in range(2):
        s_ref, t_ref, count = naive_spans(student, teacher, b)
        assert int(counts[b]) == count
        assert {i: int(t_ids[b, i]) for i in t_ref} == t_ref
        tail = [i for i in response_positions(teacher, b) if i not in t_ref]
        assert all(int(t_ids[b, i]) == -1 for i in tail)  # teacher tokens past the student's cut
        if b == 0:  # the first answer is cut on the student side only
            assert len(tail) > 50


def test_response_input_mask_skips_the_last_prompt_position(real_views) -> None:
    (student, _), records = real_views
    mask = response_input_mask(student)
    for b, record in enumerate(records):
        starts = [int(student.input_offsets[b, i, 0]) for i in range(mask.shape[1]) if mask[b, i]]
        assert min(starts) >= len(record.prompt)
        first_valid = int(student.label_mask[b].nonzero()[0])
        assert not mask[b, first_valid] and int(student.input_offsets[b, first_valid, 1]) <= len(record.prompt)


def test_centres_of_mass_match_loops() -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 7, generator=gen, dtype=torch.float64) + 0.1
    ids = torch.tensor([[0, 0, 1, -1, 2, 2, 2], [-1, 1, 1, 0, -1, -1, -1]])
    centres, mass = pool(hidden, weights, ids, 3)
    for b in range(2):
        for k in range(3):
            members = [t for t in range(7) if int(ids[b, t]) == k]
            if not members:
                assert float(mass[b, k]) == 0 and torch.all(centres[b, k] == 0)
                continue
            ref, ref_mass = naive_centre(hidden[b], weights[b].tolist(), members)
            torch.testing.assert_close(centres[b, k], ref, rtol=1e-12, atol=1e-12)
            assert float(mass[b, k]) == pytest.approx(ref_mass, rel=1e-12)
    # gradient of Σ centres flows to the hidden states with the normalised weights
    centres.sum().backward()
    for t in range(7):
        k = int(ids[0, t])
        want = 0.0 if k < 0 else float(weights[0, t]) / float(mass[0, k])
        assert torch.allclose(hidden.grad[0, t], torch.full((5,), want, dtype=torch.float64))
    counts = unit_token_counts(ids, 3)
    assert counts.tolist() == [[2, 1, 3], [1, 2, 0]]


def test_weightless_unit_is_a_plain_mean_with_finite_gradients() -> None:
    """Attention dropout can give every token of a span weight 0: its centre is the plain mean of its tokens (mass
    0), and a large upstream gradient stays finite (dividing by a clamped zero mass would give inf·0 = NaN)."""
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]]], requires_grad=True)
    weights = torch.tensor([[0.0, 0.0, 0.7]])
    centres, mass = pool(hidden, weights, torch.tensor([[0, 0, 1]]), 2)
    assert centres[0, 0].tolist() == [2.0, 4.0] and centres[0, 1].tolist() == [5.0, 1.0]
    assert mass[0].tolist() == pytest.approx([0.0, 0.7])
    (1e30 * centres.sum()).backward()
    assert torch.isfinite(hidden.grad).all() and hidden.grad[0, 0, 0].item() == pytest.approx(0.5e30)


def test_token_weighted_mean_is_a_global_weighted_average() -> None:
    labels = torch.tensor([[-100, 1, 1, 1], [-100, -100, 1, -100]])
    view = TokenView(labels, labels, labels, labels, labels)
    values = torch.tensor([2.0, 5.0])
    # 3 and 1 tokens: weights 3/N and 1/N; N = 4 (this micro-batch alone) → (6 + 5)/4
    assert float(token_weighted_mean(values, view, torch.tensor(4))) == pytest.approx(11 / 4)
    # the same batch as half of a global batch of 8 tokens contributes half
    assert float(token_weighted_mean(values, view, torch.tensor(8))) == pytest.approx(11 / 8)


def test_structure_loss_hand_worked() -> None:
    """3 units: cos_a = (0, 1/√2, 1/√2), cos_b = (1, 0, 0) off the diagonal; masses 1, 2, 1.
    Pair weights 2, 1, 2 (each counted twice); squared gaps 1, ½, ½ → (2·1 + 1·½ + 2·½)·2 / (2 + 1 + 2)·2 = 0.7."""
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    b = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    masses = torch.tensor([[1.0, 2.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert float(structure_loss(a, b, masses, mask)) == pytest.approx(0.7, rel=1e-12)
    # a missing unit drops out: units 0 and 2 only → gap (1/√2 − 0)² = ½
    assert float(structure_loss(a, b, masses, torch.tensor([[True, False, True]]))) == pytest.approx(0.5)
    # one unit: nothing to compare
    assert float(structure_loss(a, b, masses, torch.tensor([[True, False, False]]))) == 0.0


def test_weighted_cosine_distance_hand_worked() -> None:
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    b = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    m = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    assert float(weighted_cosine_distance(a, b, m, torch.ones(1, 2, dtype=torch.bool))) == pytest.approx(0.75)


def test_relational_losses_match_loops() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64)
    m = torch.rand(3, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 6, generator=gen) > 0.3
    got_s, got_w = structure_loss(a, b, m, mask), weighted_cosine_distance(a, b[..., :4], m, mask)
    for k in range(3):
        units = [u for u in range(6) if mask[k, u]]
        ref_s = naive_structure([a[k, u] for u in units], [b[k, u] for u in units], [float(m[k, u]) for u in units])
        ref_w = naive_weighted_distance([a[k, u] for u in units], [b[k, u, :4] for u in units],
                                        [float(m[k, u]) for u in units])
        assert float(got_s[k]) == pytest.approx(float(ref_s), rel=1e-10, abs=1e-14)
        assert float(got_w[k]) == pytest.approx(float(ref_w), rel=1e-10, abs=1e-14)


def test_token_weights_match_loops() -> None:
    gen = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    attention = torch.softmax(torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64), -1)
    hidden = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    got_a, got_s = last_token_attention(attention, mask), self_similarity_weights(hidden, mask)
    for b in range(2):
        assert got_a[b].tolist() == pytest.approx(naive_last_token_attention(attention, mask, b), rel=1e-12)
        assert got_s[b].tolist() == pytest.approx(naive_self_similarity(hidden, mask, b), rel=1e-9, abs=1e-15)
    assert float(got_a[1, 3:].abs().sum()) == 0.0 and float(got_s[1, 3:].abs().sum()) == 0.0


# ---------------------------------------------------------------------------------------------- layer pairs


def naive_proportional(ls: int, lt: int, n: int) -> list[tuple[int, int]]:
    n = min(n, ls, lt)
    return [(math.floor(k * ls / n + 0.5), math.floor(k * lt / n + 0.5)) for k in range(1, n + 1)]


@pytest.mark.parametrize("ls,lt", [(12, 24), (22, 32), (2, 2), (1, 5), (24, 12), (32, 28), (6, 7)])
def test_layer_maps_for_unequal_depths(ls: int, lt: int) -> None:
    pairs = proportional_pairs(ls, lt, 4)
    assert pairs == naive_proportional(ls, lt, 4)
    assert pairs[-1] == (ls, lt)  # the final layers are paired
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(pairs, pairs[1:]))  # increasing on both sides
    assert all(1 <= s <= ls and 1 <= t <= lt for s, t in pairs)
    top = top_pairs(ls, lt, 3)
    assert top[-1] == (ls, lt) and all(s >= 1 and t >= 1 for s, t in top)
    assert all(b[0] - a[0] == 2 and b[1] - a[1] == 2 for a, b in zip(top, top[1:]))


def test_layer_maps_of_the_reference_recipes() -> None:
    assert proportional_pairs(12, 24, 4) == [(3, 6), (6, 12), (9, 18), (12, 24)]
    assert top_pairs(22, 32, 3) == [(18, 28), (20, 30), (22, 32)]  # SRA's TinyLlama ↔ Mistral script
    assert top_pairs(12, 24, 3) == [(8, 20), (10, 22), (12, 24)]
    assert top_pairs(2, 2, 3) == [(2, 2)]


def test_layer_pair_checks_name_the_option() -> None:
    assert check_layer_pairs("layer_pairs", [[1, 2], [3, 4]]) == [(1, 2), (3, 4)]
    assert check_layer_pairs("layer_pairs", None) is None
    for bad in ([], [[1]], [[1, -1]], [[1, 2], [1, 2]], "1,2", [[1.5, 2]], [[True, 2]]):
        with pytest.raises(OptionError, match="method.options.layer_pairs"):
            check_layer_pairs("layer_pairs", bad)
    with pytest.raises(OptionError, match="≥ 1"):
        check_layer_pairs("layer_pairs", [[0, 1]], lowest=1)
    with pytest.raises(OptionError, match="out of range: the student has 2 layers"):
        check_pairs_fit("layer_pairs", [(1, 1), (3, 2)], 2, 4)


def test_layer_depth_and_width_from_configs() -> None:
    from transformers import GPT2Config, OPTConfig, Qwen2Config

    assert num_layers(GPT2Config(n_layer=5)) == 5 and num_layers(Qwen2Config(num_hidden_layers=7)) == 7
    opt = OPTConfig(hidden_size=16, word_embed_proj_dim=12, num_hidden_layers=3)
    assert layer_width(opt, 3) == 12 and layer_width(opt, 1) == 16 and layer_width(opt, 0) == 16
    assert layer_width(GPT2Config(n_embd=24, n_layer=2), 2) == 24


# ---------------------------------------------------------------------------------------------- text units


def test_token_unit_ids_strip_whitespace_and_reject_straddling_tokens() -> None:
    text = "The quick fox, ok"
    units = [(0, 3), (4, 9), (10, 13)]  # The | quick | fox
    offsets = [(0, 3), (3, 9), (9, 13), (13, 14), (14, 17), (-1, -1), (8, 11), (3, 4)]
    #          The   " quick" " fox"   ","    " ok"  pad    straddles "k f"  space only
    assert token_unit_ids(offsets, units, text) == [0, 1, 2, -1, -1, -1, -1, -1]


def test_token_unit_ids_on_real_tokenizations(gpt2_tokenizer, qwen_tokenizer) -> None:
    """Every token inside a word gets that word; naive check: its stripped text is a substring of the word."""
    text = "The quick brown fox jumps over the lazy dog while distillation moves knowledge."
    words, start = [], 0
    for word in text.rstrip(".").split(" "):
        words.append((start, start + len(word)))
        start += len(word) + 1
    for tok in (gpt2_tokenizer, qwen_tokenizer):
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        ids = token_unit_ids(offsets, words, text)
        for (s, e), k in zip(offsets, ids):
            piece = text[s:e].strip()
            inside = [w for w, (a, b) in enumerate(words) if piece and a <= text.index(piece, s) and
                      text.index(piece, s) + len(piece) <= b]
            assert k == (inside[0] if inside else -1), (text[s:e], k)
        assert {k for k in ids if k >= 0} == set(range(len(words)))  # every word has a token


def test_paper_recipes_layer_maps_fit_the_models() -> None:
    """configs/paper/*-sra.yaml and *-mta.yaml name layers that exist in the hub models they use (depths below)."""
    from dwakd.config import load_config
    from dwakd.methods import build_options

    depth = {"openai-community/gpt2": 12, "runs/teacher-sft/qwen1.5-1.8b": 24,  # Qwen1.5-1.8B after its SFT
             "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": 22, "mistralai/Mistral-7B-v0.1": 32,
             "facebook/opt-2.7b": 32, "Qwen/Qwen2.5-7B-Instruct": 28}
    paper = ROOT / "configs" / "paper"
    recipes = sorted(paper.glob("*-sra.yaml")) + sorted(paper.glob("*-mta.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        config = load_config(path)
        options = build_options(config.method.name, config.method.options)
        check_pairs_fit("layer_pairs", [tuple(p) for p in options.layer_pairs], depth[config.student.name_or_path],
                        depth[config.teacher.name_or_path])
