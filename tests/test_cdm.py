"""CDM against hand-worked cases (weights, weighted DTW path, pooling, dynamic map) and a naive float64 reference of
the whole loss (value and gradient), written like the reference code: Python loops, per sequence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _baseline_helpers import (
    Setup,
    leaf_logits,
    naive_ce_sum,
    naive_dtw,
    naive_levenshtein,
    optimise_steps,
    params_with_grad,
    trainable_names,
)

from dwakd.alignment.dynamic_map import byte_arrays, dynamic_vocab_map, levenshtein, pooling_plan
from dwakd.alignment.token_strings import TokenTable, token_table
from dwakd.methods import build_method, build_options, method_names
from dwakd.methods.base import OptionError, TokenView
from dwakd.methods.cdm import CDM, entropy_factors, row_entropy


def view(ids: list[list[int]]) -> TokenView:
    """A TokenView whose every position is a label (offsets unused by CDM); rows right-padded with −100."""
    width = max(len(r) for r in ids)
    labels = torch.full((len(ids), width), -100, dtype=torch.long)
    for b, row in enumerate(ids):
        labels[b, : len(row)] = torch.tensor(row)
    zeros = torch.zeros(len(ids), width, 2, dtype=torch.long)
    return TokenView(labels.clamp_min(0), labels.ne(-100).long(), labels, zeros, zeros)


# ---------------------------------------------------------------------------------------- hand-worked cases
def test_entropy_factors_by_hand():
    entropy = torch.tensor([0.0, 1.0, 2.0, 7.0, 7.0, 0.5], dtype=torch.float64)
    segment = torch.tensor([0, 0, 0, 1, 1, 2])
    # segment 0: Ĥ = 0, ½, 1 → 3 + 3σ(−2) = 3.36, 3 + 3σ(0) = 4.5, 3 + 3σ(2) = 5.64
    # constant segments → Ĥ = 0
    assert entropy_factors(entropy, segment, 3).tolist() == [3.0, 4.0, 5.0, 3.0, 3.0, 3.0]


def test_pooling_plan_by_hand():
    # teacher 0 ↔ students 0, 1; teacher 1 ↔ student 2; teacher 2 ↔ students 2, 3
    path = np.array([[0, 0], [0, 1], [1, 2], [2, 2], [2, 3]])
    groups, student, teacher = pooling_plan(path, 4, 3)
    assert groups == 3  # student groups [0, 1], [2], [2, 3]
    s = np.zeros((3, 4))
    np.add.at(s, (student[0], student[1]), student[2])
    t = np.zeros((3, 3))
    np.add.at(t, (teacher[0], teacher[1]), teacher[2])
    np.testing.assert_allclose(s, [[0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0.5, 0.5]])
    # student 2 sees teachers {1, 2}: g1 = (t1 + t2)/2, g2 = ((t1 + t2)/2 + t2)/2; g0 = (t0 + t0)/2
    np.testing.assert_allclose(t, [[1, 0, 0], [0, 0.5, 0.5], [0, 0.25, 0.75]])
    # the method's sparse product adds the repeated (g2, t2) entries like np.add.at
    plan = tuple(torch.as_tensor(x) for x in teacher)
    rows = torch.tensor([[1.0, 0.0], [0.0, 4.0], [2.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(CDM.pool(rows, plan, groups, 2), torch.as_tensor(t) @ rows)
    with pytest.raises(ValueError, match="run from"):
        pooling_plan(np.array([[0, 1], [2, 3]]), 4, 3)


def test_weighted_dtw_path_and_pooling_by_hand(tmp_path):
    """Teacher "b","ba","a" vs student "ca","bb": entropy weights move "ba" from "ca" to "bb".

    Edit distances (rows teacher): [[2, 1], [1, 1], [1, 2]]. Plain: D = [[2, 3], [3, 3], [4, 5]], backtrack from
    (2, 1) takes the diagonal (tie 3 = 3 with "up") → (0,0), (1,0), (2,1). With w_T = (5, 3, 5), w_S = (5, 3):
    costs [[50, 15], [15, 9], [25, 30]], D = [[50, 65], [65, 59], [90, 89]]; from (2, 1) "up" (59) beats the
    diagonal (65) → (0,0), (1,1), (2,1).
    """
    setup = Setup()
    method = build_method("cdm", setup.context(tmp_path))
    method.teacher_strings, method.student_strings = ["b", "ba", "a"], ["ca", "bb"]
    method.teacher_eos = method.student_eos = None
    student, teacher = view([[0, 1]]), view([[0, 1, 2]])
    plain = method.align(student, teacher, None, None)
    assert plain.paths[0].tolist() == [[0, 0], [1, 0], [2, 1]]
    weighted = method.align(student, teacher, torch.tensor([5.0, 3.0]), torch.tensor([5.0, 3.0, 5.0]))
    assert weighted.paths[0].tolist() == [[0, 0], [1, 1], [2, 1]]
    t_logits = torch.tensor([[1.0, 0.0], [0.0, 4.0], [2.0, 2.0]], dtype=torch.float64)
    s_logits = torch.tensor([[3.0, 1.0], [5.0, 7.0]], dtype=torch.float64)
    pooled_t = CDM.pool(t_logits, weighted.teacher, weighted.groups, 2)
    pooled_s = CDM.pool(s_logits, weighted.student, weighted.groups, 2)
    torch.testing.assert_close(pooled_t, torch.tensor([[1.0, 0.0], [1.0, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(pooled_s, s_logits)
    pooled_t = CDM.pool(t_logits, plain.teacher, plain.groups, 2)  # (t0 + t1)/2, t2
    torch.testing.assert_close(pooled_t, torch.tensor([[0.5, 2.0], [2.0, 2.0]], dtype=torch.float64))


def table(texts: list[bytes]) -> TokenTable:
    return TokenTable(tuple(texts), np.zeros(len(texts), dtype=bool), None, "other")


def test_dynamic_vocab_map_by_hand():
    source = byte_arrays(table([b" the", b"Hello", b"wor", b"xyz", b"abz", b""]))
    target = byte_arrays(table([b"the", b"Hell", b" world", b"abc", b"abd", b"\t"]))
    exact = np.array([0, -1, -1, -1, -1, -1])  # " the" and "the" share the text once spaces are removed
    source_topk = np.array([[1, 2, 3, 0, 4, 5]])
    target_topk = np.array([[2, 1, 3, 4, 5, 0]])
    got = dynamic_vocab_map(source_topk, target_topk, exact, source, target, 0.3)
    # Hello: Hell 1/9 < world 4/10; wor: world 2/8 = 0.25 < 0.3; xyz: abc 3/6 (no); the: exact;
    # abz: abc and abd both 1/6, the better-ranked (abc, rank 2) wins; "" vs "\t": 1/1 (no), vs nothing equal
    assert got.tolist() == [[1, 2, -1, 0, 3, -1]]
    assert dynamic_vocab_map(source_topk, target_topk, exact, source, target, 0.25)[0, 1] == -1  # strict <
    both_empty = byte_arrays(table([b"  "]))
    assert dynamic_vocab_map(np.array([[0]]), np.array([[0]]), np.array([-1]), both_empty, both_empty, 0.3)[0, 0] == 0


def test_levenshtein_kernels_match_the_textbook_dp():
    """Bit-parallel for patterns up to 64 bytes, row DP beyond; lengths around the word size and empty strings."""
    rng = np.random.default_rng(0)
    lengths = [0, 1, 2, 5, 17, 63, 64, 65, 90]
    for la in lengths:
        for lb in lengths:
            for alphabet in (2, 7, 256):
                a = bytes(rng.integers(0, alphabet, la, dtype=np.uint8))
                b = bytes(rng.integers(0, alphabet, lb, dtype=np.uint8))
                assert levenshtein(a, b) == naive_levenshtein(a, b), (la, lb, alphabet)
    # the dynamic map uses the same kernels: with θ = 1 every candidate qualifies and the closest one wins
    words = [bytes(rng.integers(97, 101, int(n), dtype=np.uint8)) for n in rng.integers(1, 80, 40)]
    source, target = byte_arrays(table(words[:20])), byte_arrays(table(words[20:]))
    got = dynamic_vocab_map(np.arange(20)[None], np.arange(20)[None], np.full(20, -1), source, target, 1.0)
    for a in range(20):
        dists = [naive_normalised_distance(words[a], words[20 + c]) for c in range(20)]
        best = min(range(20), key=lambda c: (dists[c], c))
        assert got[0, a] == (best if dists[best] < 1.0 else -1)


def test_row_entropy_matches_a_loop():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 40, dtype=torch.float64, generator=generator) * torch.tensor([0.1, 1, 10] * 3)[:, None]
    logits[0, 5:] = -torch.inf  # a distribution that rules tokens out
    got = row_entropy(logits, 37, chunk_elements=80)  # 2 rows per chunk; the last 3 columns are head padding
    for r in range(9):
        p = torch.softmax(logits[r, :37], -1)
        expected = -sum(float(q) * math.log(float(q)) for q in p if q > 0)
        assert float(got[r]) == pytest.approx(expected, rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------------------------- naive reference loss
def naive_entropy_weights(logits: torch.Tensor, positions: list[int], vocab: int) -> list[float]:
    entropies = []
    for p in positions:
        probs = torch.softmax(logits[p, :vocab].detach().double(), -1)
        entropies.append(-sum(float(q) * math.log(float(q)) for q in probs if q > 0))
    low, high = min(entropies), max(entropies)
    norm = [(h - low) / (high - low) if high > low else 0.0 for h in entropies]
    return [float(math.floor(3 + 3 / (1 + math.exp(-(4 * x - 2))))) for x in norm]


def naive_normalised_distance(a: bytes, b: bytes) -> float:
    return 0.0 if len(a) + len(b) == 0 else naive_levenshtein(a, b) / (len(a) + len(b))


def naive_map(candidates, others, exact: dict[int, int], src_text, dst_text, theta: float) -> list[int]:
    out = []
    for token in candidates:
        if token in exact:
            out.append(exact[token])
            continue
        best, best_d = -1, theta
        for other in others:
            d = naive_normalised_distance(src_text[token], dst_text[other])
            if d < best_d:
                best, best_d = other, d
        out.append(best)
    return out


def naive_cdm_kd(setup: Setup, s_logits, t_logits, top_k: int, tau: float, theta: float = 0.3,
                 teacher_tau: bool = True):
    """Σ over pooled positions of KL(teacher columns → student columns), by loops; and mapping counts."""
    s_tab, t_tab = token_table(setup.s_tok), token_table(setup.t_tok)
    s_text = [d.replace(b" ", b"") for d in s_tab.data]
    t_text = [d.replace(b" ", b"") for d in t_tab.data]
    vs, vt = len(setup.s_tok), len(setup.t_tok)
    t2s = {t: next(s for s in range(vs) if s_tab.data[s] == d) for t, d in enumerate(t_tab.data)
           if d and any(x == d for x in s_tab.data)}
    s2t = {s: next(t for t in range(vt) if t_tab.data[t] == d) for s, d in enumerate(s_tab.data)
           if d and any(x == d for x in t_tab.data)}
    t_eos, s_eos = setup.t_tok.eos_token_id, setup.s_tok.eos_token_id
    t2s[t_eos], s2t[s_eos] = s_eos, t_eos
    t_logits = t_logits.detach()
    total = s_logits.new_zeros(())
    counts = {"exact": 0, "dynamic": 0, "unmapped": 0}
    for b in range(setup.s_view.labels.shape[0]):
        s_pos = [p for p in range(setup.s_view.labels.shape[1]) if setup.s_view.labels[b, p] != -100]
        t_pos = [p for p in range(setup.t_view.labels.shape[1]) if setup.t_view.labels[b, p] != -100]
        s_ids = [int(setup.s_view.labels[b, p]) for p in s_pos]
        t_ids = [int(setup.t_view.labels[b, p]) for p in t_pos]
        w_s = naive_entropy_weights(s_logits[b], s_pos, vs)
        w_t = naive_entropy_weights(t_logits[b], t_pos, vt)
        cost = [[0.0 if (ti == t_eos and si == s_eos) else
                 naive_levenshtein(t_text[ti], s_text[si]) * w_t[i] * w_s[j]
                 for j, si in enumerate(s_ids)] for i, ti in enumerate(t_ids)]
        path = naive_dtw(cost)
        base_to_blending = [[i for i, j in path if j == jj] for jj in range(len(s_ids))]  # student → teachers
        blending_to_base = [[j for i, j in path if i == ii] for ii in range(len(t_ids))]  # teacher → students
        t_merged = [torch.stack([t_logits[b, t_pos[i], :vt] for i in lst]).mean(0) for lst in base_to_blending]
        groups = []
        for lst in blending_to_base:
            if lst not in groups:
                groups.append(lst)
        for group in groups:
            t_pool = torch.stack([t_merged[j] for j in group]).mean(0)
            s_pool = torch.stack([s_logits[b, s_pos[j], :vs] for j in group]).mean(0)
            t_top = torch.topk(t_pool, top_k).indices.tolist()
            s_top = torch.topk(s_pool.detach(), top_k).indices.tolist()
            t_to_s = naive_map(t_top, s_top, t2s, t_text, s_text, theta)
            s_to_t = naive_map(s_top, t_top, s2t, s_text, t_text, theta)
            for cand, mapped, exact in ((t_top, t_to_s, t2s), (s_top, s_to_t, s2t)):
                for c, x in zip(cand, mapped):
                    counts["exact" if c in exact else "dynamic" if x >= 0 else "unmapped"] += 1
            big = torch.tensor(-1e4, dtype=s_logits.dtype)
            teacher_cols = [t_pool[t] if x >= 0 else big for t, x in zip(t_top, t_to_s)]
            teacher_cols += [t_pool[x] if x >= 0 else big for x in s_to_t]
            student_cols = [s_pool[x] if x >= 0 else big for x in t_to_s]
            student_cols += [s_pool[s] if x >= 0 else big for s, x in zip(s_top, s_to_t)]
            t_vec, s_vec = torch.stack(teacher_cols), torch.stack(student_cols)
            log_p = torch.log_softmax(t_vec / (tau if teacher_tau else 1.0), -1)
            log_q = torch.log_softmax(s_vec / tau, -1)
            total = total + (log_p.exp() * (log_p - log_q)).sum()
    return total, counts


@pytest.fixture(scope="module")
def setup():
    return Setup()


def test_registered_and_option_errors():
    assert "cdm" in method_names()
    assert build_options("cdm").top_k == 100 and build_options("cdm").similarity_threshold == 0.3
    for name, value in [("kd_objective", "kl2"), ("top_k", 0), ("top_k", 2.5), ("similarity_threshold", 1.5),
                        ("kd_temperature", 0.0), ("kd_rate", -0.1)]:
        with pytest.raises(OptionError) as info:
            build_options("cdm", {name: value})
        assert info.value.option == name


@pytest.mark.parametrize("teacher_tau", [True, False])
def test_loss_and_gradients_match_naive(setup, tmp_path, teacher_tau):
    opts = {"top_k": 24, "kd_temperature": 1.5, "temperature_on_teacher": teacher_tau}
    method = build_method("cdm", setup.context(tmp_path), opts)
    inputs = setup.inputs()
    s_logits, t_logits = leaf_logits(inputs)
    out = method(inputs)
    n = inputs.num_items
    s_ref = s_logits.detach().clone().requires_grad_(True)
    kd_sum, counts = naive_cdm_kd(setup, s_ref, t_logits, 24, 1.5, teacher_tau=teacher_tau)
    assert min(counts.values()) > 0, counts  # exact, dynamic and unmapped columns all occur
    mapped = (counts["exact"] + counts["dynamic"]) / sum(counts.values())
    assert out.stats["mapped_fraction"] == pytest.approx(mapped)
    kd = kd_sum / n
    ref = 0.5 * naive_ce_sum(s_ref, setup.s_view.labels, len(setup.s_tok)) / n + 0.5 * kd
    torch.testing.assert_close(out.parts["kd"], kd.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-9)  # the shared CE helper runs in fp32
    out.loss.backward()
    ref.backward()
    torch.testing.assert_close(s_logits.grad, s_ref.grad, rtol=1e-5, atol=1e-8)
    assert t_logits.grad is None
    assert s_logits.grad[..., len(setup.s_tok):].abs().sum() == 0
    assert s_logits.grad[~setup.s_view.label_mask].abs().sum() == 0


def test_batch_equals_sum_of_single_sequences(setup, tmp_path):
    """Batch > 1: the KD sum of a batch is the sum of its sequences' KD sums (no cross-talk, padding ignored)."""
    method = build_method("cdm", setup.context(tmp_path), {"top_k": 16})
    inputs = setup.inputs()
    whole = method(inputs).parts["kd"] * inputs.num_items
    parts = 0.0
    for b in range(setup.s_view.labels.shape[0]):
        single = Setup()
        single.student, single.teacher = setup.student, setup.teacher

        def row(v: TokenView, b: int = b) -> TokenView:
            keep = int(v.attention_mask[b].sum())
            return TokenView(*(t[b:b + 1, :keep] for t in (v.input_ids, v.attention_mask, v.labels,
                                                           v.input_offsets, v.label_offsets)))

        single.s_view, single.t_view = row(setup.s_view), row(setup.t_view)
        one = single.inputs()
        parts += float(method(one).parts["kd"] * one.num_items)
    assert float(whole) == pytest.approx(parts, rel=1e-9)


def test_gradients_reach_student_only_and_padding_invariant(tmp_path):
    setup, padded = Setup(), Setup(extra_pad=3)
    method = build_method("cdm", setup.context(tmp_path))
    out = method(setup.inputs())
    out.loss.backward()
    assert params_with_grad(setup.student) == trainable_names(setup.student)
    assert all(p.grad is None for p in setup.teacher.parameters()) and list(method.parameters()) == []
    again = build_method("cdm", padded.context(tmp_path))(padded.inputs())
    torch.testing.assert_close(again.loss.detach(), out.loss.detach(), rtol=1e-6, atol=1e-9)


def test_bf16_autocast_and_lora_student(tmp_path):
    from dwakd.models import LoraSpec, apply_lora

    setup = Setup()
    setup.student = apply_lora(setup.student.float(), LoraSpec(r=4, alpha=8, target_modules=["c_attn"]))
    setup.teacher = setup.teacher.float()
    method = build_method("cdm", setup.context(tmp_path))
    fp32 = method(setup.inputs()).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(setup.inputs())
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(fp32.item(), rel=5e-2)
    out.loss.backward()
    grads = {n for n, p in setup.student.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def test_optimisation_reduces_loss(tmp_path):
    setup = Setup(seed=4)
    method = build_method("cdm", setup.context(tmp_path), {"kd_rate": 0.9})
    losses = optimise_steps(setup, method, steps=6)
    assert losses[-1] < losses[0]
