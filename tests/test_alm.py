"""ALM against naive references: chunk boundaries on real Qwen/GPT-2 text, the fused log-probabilities, the binarised
divergences, and the whole loss (value and gradient) on two small real tokenizers of different kinds."""

from __future__ import annotations

import math

import pytest
import torch
from _baseline_helpers import (
    Setup,
    encode,
    leaf_logits,
    optimise_steps,
    params_with_grad,
    trainable_names,
)

from dwakd.alignment.chunks import common_chunks
from dwakd.methods import build_method, build_options, method_names
from dwakd.methods.alm import (
    binarised_divergence,
    label_log_probs,
    label_log_probs_reference,
)
from dwakd.methods.base import OptionError

PROMPT = "### Instruction:\nAnswer.\n\n### Response:\n"
RESPONSES = [
    "def f(x):\n\treturn x**2  # café 12345\n\n    end()",
    ("Prices: 3,141,592 ≈ π × 10⁶; naïve façade — 日本語テキスト 😀👍🏽 "
     "family: 👨\u200d👩\u200d👧!"),
    "   leading spaces\t\ttabs\n\n\nnewlines   trailing   ",
    "",
    "x = [1, 22, 333]  # 🏳️\u200d🌈 ok",
]


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted (character -> byte), written out independently of dwakd."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = dict(zip(printable, printable)), 0
    for byte in range(256):
        if byte not in codes:
            codes[byte] = 256 + extra
            extra += 1
    return {chr(code): byte for byte, code in codes.items()}


def token_bytes(tokenizer, token_id: int, decoder: dict[str, int]) -> bytes:
    return bytes(decoder[c] for c in tokenizer.convert_ids_to_tokens(token_id))


def naive_byte_chunks(view, tokenizer, b: int, response: str, decoder):
    """(label positions, chunk-end byte offsets of the text tokens, complete) of one row, by a loop over tokens."""
    positions = [p for p in range(view.labels.shape[1]) if view.labels[b, p] != -100]
    ids = [int(view.labels[b, p]) for p in positions]
    complete = bool(ids) and ids[-1] == tokenizer.eos_token_id
    ends, total = [], 0
    for token_id in ids[:-1] if complete else ids:
        total += len(token_bytes(tokenizer, token_id, decoder))
        ends.append(total)
    assert response.encode()[: total] == b"".join(token_bytes(tokenizer, i, decoder)
                                                  for i in (ids[:-1] if complete else ids))
    return positions, ends, complete


def naive_chunk_ids(student_view, teacher_view, tokenizers, responses, decoder):
    """Expected chunk id of every label position on both sides: shared byte ends that are character boundaries."""
    expected_s, expected_t, offset = {}, {}, 0
    for b, response in enumerate(responses):
        char_bounds = {len(response[:k].encode()) for k in range(len(response) + 1)}
        sides = []
        for view, tokenizer in ((student_view, tokenizers[0]), (teacher_view, tokenizers[1])):
            positions, ends, complete = naive_byte_chunks(view, tokenizer, b, response, decoder)
            allowed = {e for k, e in enumerate(ends) if e in char_bounds and (k < len(ends) - 1 or complete)}
            sides.append((positions, ends, complete, allowed))
        common = sorted(sides[0][3] & sides[1][3])
        both_complete = sides[0][2] and sides[1][2]
        for (positions, ends, _complete, _), out in zip(sides, (expected_s, expected_t)):
            for k, p in enumerate(positions):
                if k < len(ends):
                    local = next((c for c, e in enumerate(common) if ends[k] <= e), None)
                    out[(b, p)] = offset + local if local is not None else -1
                else:  # EOS
                    out[(b, p)] = offset + len(common) if both_complete else -1
        offset += len(common) + int(both_complete)
    return expected_s, expected_t, offset


@pytest.mark.parametrize("student_name", ["gpt2", "qwen"])
@pytest.mark.parametrize("max_length", [160, 40])
def test_chunks_on_real_tokenizers_match_a_byte_level_reference(gpt2_tokenizer, qwen_tokenizer, student_name,
                                                                max_length):
    """Unicode, digits, code and whitespace runs; at max_length 40 the two sides are cut at different places."""
    tokenizers = (gpt2_tokenizer, qwen_tokenizer) if student_name == "gpt2" else (qwen_tokenizer, gpt2_tokenizer)
    examples = [(PROMPT, r) for r in RESPONSES]
    s_view = encode(tokenizers[0], examples, max_prompt_length=16, max_length=max_length)
    t_view = encode(tokenizers[1], examples, max_prompt_length=16, max_length=max_length)
    plan = common_chunks(s_view.labels, s_view.label_offsets, t_view.labels, t_view.label_offsets)
    decoder = byte_decoder()
    expected_s, expected_t, total = naive_chunk_ids(s_view, t_view, tokenizers, RESPONSES, decoder)
    assert plan.num_chunks == total
    got_s = {(b, p): int(plan.student_chunk[b, p]) for b, p in expected_s}
    got_t = {(b, p): int(plan.teacher_chunk[b, p]) for b, p in expected_t}
    assert got_s == expected_s and got_t == expected_t
    assert int((plan.student_chunk >= 0).sum()) == sum(v >= 0 for v in expected_s.values())
    # properties of the implementation itself: the same bytes on both sides, whole characters, full coverage
    truncated = set()
    for b in range(len(RESPONSES)):
        texts = []
        for view, chunk, tokenizer in ((s_view, plan.student_chunk, tokenizers[0]),
                                       (t_view, plan.teacher_chunk, tokenizers[1])):
            ids = [int(view.labels[b, p]) for p in range(view.labels.shape[1]) if view.labels[b, p] != -100]
            if not ids or ids[-1] != tokenizer.eos_token_id:
                truncated.add(b)
            row_chunks = sorted({int(c) for c in chunk[b].tolist() if c >= 0})
            pieces = []
            for c in row_chunks:
                positions = (chunk[b] == c).nonzero().squeeze(1).tolist()
                pieces.append(b"".join(token_bytes(tokenizer, int(view.labels[b, p]), decoder) for p in positions
                                       if int(view.labels[b, p]) != tokenizer.eos_token_id))
            texts.append(pieces)
        assert texts[0] == texts[1], b
        for piece in texts[0]:
            piece.decode("utf-8")  # never half a character
        joined = b"".join(texts[0])
        response = RESPONSES[b].encode()
        if b in truncated:
            assert response.startswith(joined)
        else:
            assert joined == response  # every response character exactly once
    if max_length == 160:
        assert not truncated
        assert plan.is_eos.sum() == len(RESPONSES)  # one EOS chunk per row
    else:
        assert truncated and plan.is_eos.sum() == len(RESPONSES) - len(truncated)
        assert plan.num_chunks > 0


def test_chunk_end_offsets_and_last_positions(gpt2_tokenizer, qwen_tokenizer):
    examples = [(PROMPT, r) for r in RESPONSES[:3]]
    s_view = encode(gpt2_tokenizer, examples, max_prompt_length=16, max_length=160)
    t_view = encode(qwen_tokenizer, examples, max_prompt_length=16, max_length=160)
    plan = common_chunks(s_view.labels, s_view.label_offsets, t_view.labels, t_view.label_offsets)
    n, m = s_view.labels.shape[1], t_view.labels.shape[1]
    for c in range(plan.num_chunks):
        b = int(plan.row[c])
        s_pos = (plan.student_chunk[b] == c).nonzero().squeeze(1)
        t_pos = (plan.teacher_chunk[b] == c).nonzero().squeeze(1)
        assert int(plan.student_last[c]) == b * n + int(s_pos.max())
        assert int(plan.teacher_last[c]) == b * m + int(t_pos.max())
        assert int(plan.end_offset[c]) == int(s_view.label_offsets[b, s_pos.max(), 1])
        assert int(plan.end_offset[c]) == int(t_view.label_offsets[b, t_pos.max(), 1])
    assert torch.equal(plan.row_ends(), torch.cat([plan.row[1:] != plan.row[:-1], torch.tensor([True])]))


def test_a_token_straddling_two_characters_never_ends_a_chunk():
    """Text "aXY", X and Y multibyte. Student byte pieces: a (0,1) | X₁ (1,2) | X₂Y₁ (1,3) | Y₂ (2,3) | EOS (3,3);
    teacher: a | X | Y | EOS. The end 2 of X₁ is common, but the next piece starts inside X (1 < 2): no cut there."""
    s_labels = torch.tensor([[-100, 5, 6, 7, 8, 0]])
    s_offsets = torch.tensor([[[0, 0], [0, 1], [1, 2], [1, 3], [2, 3], [3, 3]]])
    t_labels = torch.tensor([[-100, 5, 6, 7, 0]])
    t_offsets = torch.tensor([[[0, 0], [0, 1], [1, 2], [2, 3], [3, 3]]])
    plan = common_chunks(s_labels, s_offsets, t_labels, t_offsets)
    assert plan.student_chunk.tolist() == [[-1, 0, 1, 1, 1, 2]]
    assert plan.teacher_chunk.tolist() == [[-1, 0, 1, 1, 2]]
    assert plan.end_offset.tolist() == [1, 3, 3] and plan.is_eos.tolist() == [False, False, True]


def test_chunks_reject_non_contiguous_labels():
    labels = torch.tensor([[5, -100, 6]])
    offsets = torch.tensor([[[0, 1], [1, 2], [2, 3]]])
    with pytest.raises(ValueError, match="contiguous"):
        common_chunks(labels, offsets, labels, offsets)


# ---------------------------------------------------------------------------------- fused log-probabilities
@pytest.mark.parametrize("with_space", [False, True])
def test_label_log_probs_match_reference_and_gradcheck(with_space):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 13, dtype=torch.float64, generator=generator) * 3  # 3 head padding rows
    labels = torch.randint(0, 10, (7,), generator=generator)
    space = torch.rand(10, generator=generator) < 0.4 if with_space else None
    got = label_log_probs(logits, labels, 10, space, chunk_elements=25)  # 2 rows per chunk
    ref = label_log_probs_reference(logits, labels, 10, space)
    naive_label = torch.stack([torch.log_softmax(logits[r, :10], -1)[labels[r]] for r in range(7)])
    torch.testing.assert_close(got[0], naive_label)
    torch.testing.assert_close(got[1], ref[1])
    if with_space:
        naive_space = torch.stack([torch.log(torch.softmax(logits[r, :10], -1)[space].sum()) for r in range(7)])
        torch.testing.assert_close(got[1], naive_space)
    leaf = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: label_log_probs(z, labels, 10, space, chunk_elements=25), (leaf,))
    weights = torch.randn(2, 7, dtype=torch.float64, generator=generator)
    (got_l, got_s) = label_log_probs(leaf, labels, 10, space, chunk_elements=25)
    (weights[0] * got_l + weights[1] * got_s).sum().backward()
    assert leaf.grad[:, 10:].abs().sum() == 0  # head padding rows get no gradient


def test_label_log_probs_bf16_logits_compute_in_fp32():
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(5, 40, generator=generator) * 4).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 40, (5,), generator=generator)
    space = torch.arange(40) % 3 == 0
    label_lp, space_lp = label_log_probs(logits, labels, 40, space)
    assert label_lp.dtype == torch.float32
    ref = label_log_probs_reference(logits.detach().double(), labels, 40, space)
    torch.testing.assert_close(label_lp.double(), ref[0], rtol=1e-6, atol=1e-6)
    (label_lp.sum() + space_lp.sum()).backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


# -------------------------------------------------------------------------------------- binarised divergences
def naive_divergence(t: float, s: float, kind: str, tau: float, eps: float = 1e-6) -> float:
    """The reference's formulas, one chunk at a time with the math module."""
    if kind == "abs":
        return abs(t - s)
    if kind == "binary_kl_temp_limit":
        a, b = t - eps, s - eps
        return (a - b) + a * math.log(-b) - a * math.log(-a)
    a, b = t / tau - eps, s / tau - eps
    pa, pb = math.exp(a), math.exp(b)
    if kind == "abs_exp":
        return abs(pa - pb)
    if kind == "binary_ce":
        return -(pa * b + (1 - pa) * math.log(1 - pb))
    if kind == "binary_kl":
        return pa * (a - b) + (1 - pa) * (math.log(1 - pa) - math.log(1 - pb))
    if kind == "reverse_binary_kl":
        return pb * (b - a) + (1 - pb) * (math.log(1 - pb) - math.log(1 - pa))
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["binary_ce", "binary_kl", "reverse_binary_kl", "binary_kl_temp_limit", "abs",
                                  "abs_exp"])
def test_binarised_divergences_match_formulas(kind):
    teacher = torch.tensor([-0.01, -0.7, -3.0, -25.0, -1e-4, -60.0], dtype=torch.float64)
    student = torch.tensor([-0.3, -0.7, -8.0, -2.0, -1e-3, -61.0], dtype=torch.float64)
    got = binarised_divergence(teacher, student, kind, 100.0)
    expected = torch.tensor([naive_divergence(t, s, kind, 100.0) for t, s in zip(teacher.tolist(), student.tolist())],
                            dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    leaf = student.clone().requires_grad_(True)
    if kind not in ("abs", "abs_exp"):  # |.| is not differentiable at the tie (chunk 2)
        assert torch.autograd.gradcheck(lambda s: binarised_divergence(teacher, s, kind, 100.0), (leaf,))


def test_binary_kl_is_binary_ce_minus_a_student_constant():
    teacher = torch.tensor([-0.2, -4.0, -30.0], dtype=torch.float64)
    student = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64, requires_grad=True)
    ce = binarised_divergence(teacher, student, "binary_ce", 100.0)
    kl = binarised_divergence(teacher, student, "binary_kl", 100.0)
    torch.testing.assert_close(ce - kl, binarised_divergence(teacher, teacher, "binary_ce", 100.0))
    assert binarised_divergence(teacher, teacher, "binary_kl", 100.0).abs().max() < 1e-12


# ------------------------------------------------------------------------------------------------ the loss
def naive_space_ids(tokenizer) -> set[int]:
    """Tokens whose string starts with a space/newline/tab marker or a raw one, and special tokens."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    starts = {"Ġ", "▁", "Ċ", "ĉ", " ", "\n", "\t"}
    return {i for i, t in enumerate(tokens) if t and t[0] in starts} | set(tokenizer.all_special_ids)


def naive_offset_chunks(view, b: int):
    """[(position, end, is_eos)] of one row and its allowed chunk ends, by a loop over positions."""
    positions = [p for p in range(view.labels.shape[1]) if view.labels[b, p] != -100]
    spans = [tuple(view.label_offsets[b, p].tolist()) for p in positions]
    has_eos = bool(positions) and spans[-1][0] == spans[-1][1]
    text = len(positions) - int(has_eos)
    allowed = set()
    for k in range(text):
        if k == text - 1:
            ok = has_eos
        else:
            ok = spans[k + 1][0] >= spans[k][1] and spans[k + 1][1] > spans[k][1]
        if ok:
            allowed.add(spans[k][1])
    return positions, spans, text, has_eos, allowed


def naive_alm_loss(setup: Setup, s_logits, t_logits, opts: dict, num_items):
    """The whole ALM loss by loops: chunks, sums, space terms, merging, divergence, normalisation."""
    tau, thr = opts.get("binarization_temperature", 100.0), opts.get("space_threshold", 0.1)
    merge, append = opts.get("merge_by_space_prob", True), opts.get("append_space", True)
    kind, rate = opts.get("divergence", "binary_ce"), opts.get("kd_rate", 0.5)
    vs, vt = len(setup.s_tok), len(setup.t_tok)
    s_space, t_space = sorted(naive_space_ids(setup.s_tok)), sorted(naive_space_ids(setup.t_tok))
    ce = s_logits.new_zeros(())
    total = s_logits.new_zeros(())
    chunk_count = 0
    for b in range(setup.s_view.labels.shape[0]):
        s_lp = torch.log_softmax(s_logits[b, :, :vs], -1)
        t_lp = torch.log_softmax(t_logits[b, :, :vt].detach(), -1)
        sp, s_spans, s_text, s_eos, s_allowed = naive_offset_chunks(setup.s_view, b)
        tp, t_spans, t_text, t_eos, t_allowed = naive_offset_chunks(setup.t_view, b)
        for p in sp:
            ce = ce - s_lp[p, setup.s_view.labels[b, p]]
        common = sorted(s_allowed & t_allowed)
        chunks = []  # (student logp, teacher logp, student space logp, teacher space logp)
        for c, end in enumerate(common):
            prev = common[c - 1] if c else -1
            s_in = [k for k in range(s_text) if prev < s_spans[k][1] <= end]
            t_in = [k for k in range(t_text) if prev < t_spans[k][1] <= end]
            s_sum = sum(s_lp[sp[k], setup.s_view.labels[b, sp[k]]] for k in s_in)
            t_sum = sum(t_lp[tp[k], setup.t_view.labels[b, tp[k]]] for k in t_in)
            s_next, t_next = sp[s_in[-1]] + 1, tp[t_in[-1]] + 1  # the row after the chunk's last token
            chunks.append((s_sum, t_sum, torch.logsumexp(s_lp[s_next, s_space], -1),
                           torch.logsumexp(t_lp[t_next, t_space], -1)))
        if s_eos and t_eos:
            zero = s_logits.new_zeros(())
            chunks.append((s_lp[sp[-1], setup.s_view.labels[b, sp[-1]]], t_lp[tp[-1], setup.t_view.labels[b, tp[-1]]],
                           zero, zero))
        group = None
        for k, (s_sum, t_sum, s_sp, t_sp) in enumerate(chunks):
            group = (group[0] + s_sum, group[1] + t_sum) if group is not None else (s_sum, t_sum)
            closes = not merge or k == len(chunks) - 1 or math.exp(float(t_sp)) > thr
            if closes:
                s_val, t_val = group[0].clamp(max=0), group[1].clamp(max=0)
                if append:
                    s_val, t_val = s_val + s_sp, t_val + t_sp
                a, bb = t_val / tau - 1e-6, s_val / tau - 1e-6
                if kind == "binary_ce":
                    total = total - (torch.exp(a) * bb + (1 - torch.exp(a)) * torch.log(1 - torch.exp(bb)))
                else:  # reverse_binary_kl
                    total = total + torch.exp(bb) * (bb - a) + (1 - torch.exp(bb)) * (
                        torch.log(1 - torch.exp(bb)) - torch.log(1 - torch.exp(a)))
                group = None
                chunk_count += 1
    loss = (1 - rate) * ce / num_items + rate * total / num_items
    return loss, total / num_items, chunk_count


@pytest.fixture(scope="module")
def setup():
    return Setup()


def test_registered_and_option_errors():
    assert "alm" in method_names()
    assert build_options("alm").binarization_temperature == 100.0
    for name, value in [("divergence", "kl"), ("binarization_temperature", 0.0), ("chunks", "words"),
                        ("space_threshold", 1.5), ("space_mask", "space+tabs"), ("chunk_weight", "tokens"),
                        ("kd_rate", 2.0), ("alm_weight", -1.0)]:
        with pytest.raises(OptionError) as info:
            build_options("alm", {name: value})
        assert info.value.option == name and f"method.options.{name}" in str(info.value)
    with pytest.raises(KeyError, match="binarization_temperature"):
        build_options("alm", {"binarization_temp": 10.0})  # unknown option: the closest one is named


def test_space_mask_matches_token_strings(setup, tmp_path, gpt2_tokenizer):
    method = build_method("alm", setup.context(tmp_path))
    assert set(method.student_space.nonzero().squeeze(1).tolist()) == naive_space_ids(setup.s_tok)
    assert set(method.teacher_space.nonzero().squeeze(1).tolist()) == naive_space_ids(setup.t_tok)
    from dwakd.alignment.token_strings import token_table
    from dwakd.methods.alm import space_token_mask

    mask = space_token_mask(token_table(gpt2_tokenizer), "space+tab+newline+special")
    assert set(mask.nonzero()[0].tolist()) == naive_space_ids(gpt2_tokenizer)


@pytest.mark.parametrize("opts", [
    {},
    {"space_threshold": 0.131},  # the random teacher's word-boundary probabilities are 0.128–0.134: mixed merges
    {"merge_by_space_prob": False, "append_space": False, "divergence": "reverse_binary_kl", "kd_rate": 0.3},
    {"merge_by_space_prob": False, "binarization_temperature": 7.0},
])
def test_loss_and_gradient_match_naive(setup, tmp_path, opts):
    method = build_method("alm", setup.context(tmp_path), opts)
    inputs = setup.inputs()
    s_logits, t_logits = leaf_logits(inputs)
    out = method(inputs)
    s_ref = s_logits.detach().clone().requires_grad_(True)
    ref, alm, groups = naive_alm_loss(setup, s_ref, t_logits, opts, inputs.num_items)
    assert groups == round(out.stats["merged_per_token"] * int(inputs.num_items))
    if opts.get("space_threshold") == 0.131:  # merging happens, but not everywhere
        assert 0 < groups < round(out.stats["chunks_per_token"] * int(inputs.num_items))
    torch.testing.assert_close(out.parts["alm"], alm.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.loss, ref, rtol=1e-9, atol=1e-12)
    out.loss.backward()
    ref.backward()
    torch.testing.assert_close(s_logits.grad, s_ref.grad, rtol=1e-7, atol=1e-12)
    assert t_logits.grad is None
    assert s_logits.grad[..., len(setup.s_tok):].abs().sum() == 0
    assert s_logits.grad[~setup.s_view.label_mask].abs().sum() == 0


def test_space_chunks_end_only_before_word_starts(setup, tmp_path):
    method = build_method("alm", setup.context(tmp_path), {"chunks": "space"})
    plan = method.chunk_plan(setup.s_view, setup.t_view)
    free = common_chunks(setup.s_view.labels, setup.s_view.label_offsets, setup.t_view.labels,
                         setup.t_view.label_offsets)
    assert 0 < plan.num_chunks < free.num_chunks
    s_space, t_space = naive_space_ids(setup.s_tok), naive_space_ids(setup.t_tok)
    n, m = setup.s_view.labels.shape[1], setup.t_view.labels.shape[1]
    for c in range(plan.num_chunks):
        if plan.is_eos[c]:
            continue
        b = int(plan.row[c])
        s_next = int(setup.s_view.labels[b, int(plan.student_last[c]) - b * n + 1])
        t_next = int(setup.t_view.labels[b, int(plan.teacher_last[c]) - b * m + 1])
        assert s_next in s_space and t_next in t_space


def test_latents_value_and_gradients_reach_student_and_projector_only(tmp_path):
    setup = Setup(seed=2)
    method = build_method("alm", setup.context(tmp_path), {"latents": True, "latents_weight": 2.0})
    assert method.needs_hidden_states and method.latent_projector.weight.shape == (24, 16)
    inputs = setup.inputs(hidden=True)
    out = method(inputs)
    # naive latent term: loop over text chunks
    plan = method.chunk_plan(setup.s_view, setup.t_view)
    h_s, h_t = inputs.student_out.hidden_states[-1], inputs.teacher_out.hidden_states[-1]
    n, m = h_s.shape[1], h_t.shape[1]
    rows_s, rows_t = [], []
    for c in range(plan.num_chunks):
        if not plan.is_eos[c]:
            b = int(plan.row[c])
            rows_s.append(h_s[b, int(plan.student_last[c]) - b * n + 1])
            rows_t.append(h_t[b, int(plan.teacher_last[c]) - b * m + 1])
    proj = method.latent_projector
    ps = torch.stack([proj.weight.double() @ r + proj.bias.double() for r in rows_s])
    ts = torch.stack(rows_t)
    scale = torch.tensor([sum(float(t[d]) ** 2 for t in rows_t) / len(rows_t) + 1e-8 for d in range(ts.shape[1])],
                         dtype=torch.float64)
    naive = sum(float(((ps[k] - ts[k]) ** 2 / scale).mean().detach()) for k in range(len(rows_s)))
    naive /= int(inputs.num_items)
    assert out.parts["latents"].item() == pytest.approx(naive, rel=1e-6)
    out.loss.backward()
    assert params_with_grad(setup.student, method) == trainable_names(setup.student, method)
    assert all(p.grad is None for p in setup.teacher.parameters())


def test_padding_invariance_and_batch_composition(tmp_path):
    setup, padded = Setup(), Setup(extra_pad=4)
    method = build_method("alm", setup.context(tmp_path))
    out = method(setup.inputs())
    again = method(padded.inputs())
    torch.testing.assert_close(again.loss, out.loss, rtol=1e-9, atol=1e-12)


def test_bf16_autocast_and_lora_student(tmp_path):
    from dwakd.models import LoraSpec, apply_lora

    setup = Setup()
    setup.student = apply_lora(setup.student.float(), LoraSpec(r=4, alpha=8, target_modules=["c_attn"]))
    setup.teacher = setup.teacher.float()
    method = build_method("alm", setup.context(tmp_path), {"latents": True})
    fp32 = method(setup.inputs(hidden=True)).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(setup.inputs(hidden=True))
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(fp32.item(), rel=5e-2)
    out.loss.backward()
    grads = {n for n, p in setup.student.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.parameters())


def test_optimisation_reduces_loss(tmp_path):
    setup = Setup(seed=4)
    method = build_method("alm", setup.context(tmp_path), {"alm_weight": 20.0})
    losses = optimise_steps(setup, method, steps=6)
    assert losses[-1] < losses[0]
